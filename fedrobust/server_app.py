"""The deployment's Flower ServerApp: the entry point of ``flwr run .`` (``pyproject.toml``).

It reads Hydra overrides from the run config key ``overrides`` and the
output folder from ``run-dir``, checks every section of the config (plug-ins'
names included) and serves the rounds (:mod:`fedrobust.rounds`).
"""

from __future__ import annotations

import shlex

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from .rounds import serve

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from .plugins import load_plugins
    from .run import prepare_run_dir
    from .validation import load_config  # every section checked, plug-ins' names included

    load_plugins()
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    cfg = load_config(overrides)
    if cfg.deployment.malicious:
        from .errors import ConfigError

        raise ConfigError("deployment.malicious: cheating nodes are simulated by fedrobust train (engine=inline or "
                          "simulation) only; a deployed run's ClientApp never cheats")
    run_dir = prepare_run_dir(cfg, str(context.run_config.get("run-dir", "")) or None)
    serve(grid, cfg, run_dir)
