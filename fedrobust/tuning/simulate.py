"""Child process of a tuning trial: ``python -m fedrobust.tuning.simulate CONFIG_JSON RUN_DIR CPUS``."""

from __future__ import annotations

import sys
from pathlib import Path

from ..config import config_from_json
from ..engines import run_simulation
from ..run import setup_logging


def main(argv: list[str]) -> int:
    spec, run_dir, cpus = argv
    cfg = config_from_json(Path(spec).read_text())
    setup_logging(Path(run_dir))
    run_simulation(cfg, Path(run_dir), num_cpus=int(cpus))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
