"""Child process of a tuning trial: ``python -m fedrobust.tuning.simulate CONFIG_JSON RUN_DIR CPUS``.

It runs in a session of its own (:mod:`.child`) and dies with the worker
that started it. SIGTERM or SIGINT end it with ``128 + signum`` after its
Ray instance is shut down; the trial's worker then reports the trial as
failed or cancelled.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .child import die_with_parent

ERROR_PREFIX = "fedrobust trial: error: "


def main(argv: list[str]) -> int:
    die_with_parent()
    from ..interrupt import guarded

    def run() -> int:
        from ..config import config_from_json
        from ..engines import run_simulation
        from ..plugins import load_plugins
        from ..run import setup_logging

        load_plugins()
        spec, run_dir, cpus = argv
        cfg = config_from_json(Path(spec).read_text())
        setup_logging(Path(run_dir))
        run_simulation(cfg, Path(run_dir), num_cpus=int(cpus))
        return 0

    def reported() -> int:
        try:
            return run()
        except Exception as exc:  # one line for the trial's error (the whole traceback is in the log above it)
            import logging
            import traceback

            logging.getLogger("fedrobust").error("trial failed:\n%s", traceback.format_exc())
            print(f"{ERROR_PREFIX}{' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr, flush=True)
            return 1

    return guarded(reported, "the trial is abandoned", prog="fedrobust trial")


if __name__ == "__main__":
    code = main(sys.argv[1:])
    if code > 128:  # interrupted: Flower's threads may still be blocked in Ray, so nothing may join them at exit
        from ..interrupt import exit_now

        exit_now(code)
    sys.exit(code)
