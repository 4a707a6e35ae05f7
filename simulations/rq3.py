"""RQ3 of the main paper: an NSGA-II study per deployment (RA_T and RA_Q, clean-accuracy constraint).

Each deployment gets its own study directory under ``--out`` and the same
tuner as ``fedrobust tune`` (resumable: run the same command again). The
paper: population 20, 100 trials, each deployment. Sized for digits on two
cores: ``--trials 12 --population 4``.

Usage: python simulations/rq3.py [--out studies/rq3] [--deployments ...] [--trials 100] [--population 20]
       [--max-concurrent 2] [overrides...]
Then: fedrobust report studies/rq3   (every deployment's front in one plot, like the paper's Fig. 4)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedrobust.validation import load_config
from fedrobust.interrupt import guarded
from fedrobust.run import preflight, setup_logging
from fedrobust.tuning import run_study
from fedrobust.tuning.report import report
from fedrobust.tuning.sweep import split_overrides

DEPLOYMENTS = ("centralized", "deep_ensemble", "distributed_iid", "distributed_dirichlet")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="studies/rq3")
    p.add_argument("--deployments", nargs="+", default=list(DEPLOYMENTS), choices=DEPLOYMENTS)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--population", type=int, default=20)
    p.add_argument("--max-concurrent", type=int, default=2)
    own, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(own)
    setup_logging()
    for dep in args.deployments:
        cfg = load_config([f"deployment={dep}", f"tune.n_trials={args.trials}", f"tune.population_size={args.population}",
                           f"tune.max_concurrent={args.max_concurrent}", f"study_dir={args.out}/{dep}", *overrides])
        preflight(cfg)
        run_study(cfg)
        report(Path(cfg.study_dir))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, "the studies are kept (completed trials in each trials.csv); run the same command to resume", prog="rq3"))
