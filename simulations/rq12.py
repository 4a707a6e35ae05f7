"""RQ1/RQ2 of the main paper: one-at-a-time grids over lr, weight decay, momentum and batch size.

For each deployment and number of nodes N (centralized: N=1) and each seed,
one hyperparameter moves over its grid while the others keep the config's
values; every cell is trained and attacked (RA_T with the transfer attack,
RA_Q with Square). Cells run in parallel on Ray and a cell already done is
skipped, so the same command resumes. ``fedrobust report OUT`` draws the
figures (the paper's Fig. 3) and the tables.

The full study: ``--params lr weight_decay momentum batch_size --nodes 1 3 5 7
--seeds 0 1 2`` over all four deployments. Sized down for digits on two
cores (the run in docs/results.md): ``--params lr --deployments distributed_dirichlet
centralized --nodes 3 --seeds 0 --lr 1e-4 1e-3 5e-3 0.01 0.05 0.1 0.2 0.4``.

Cells train with ``engine=inline`` unless an override says otherwise (the
same weights as the simulation engine, without a Ray start per cell), and
measure RA_T and RA_Q only (``attack.whitebox=[] attack.tsr=false
attack.hessian_samples=0``); later overrides replace these defaults.

Usage: python simulations/rq12.py [--out sweeps/rq12] [--params lr ...] [--deployments ...]
       [--nodes 1 3 5 7] [--seeds 0 1 2] [--max-concurrent 2] [--max-failures 3] [--lr 1e-4 1e-3 ...] [overrides...]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from fedrobust.interrupt import guarded
from fedrobust.run import setup_logging
from fedrobust.tuning.sweep import SWEEP_DEFAULTS, Cell, run_sweep, split_overrides

GRIDS = {  # the RQ1/RQ2 grids: each hyperparameter's range in the main paper's Table 1
    "lr": ("optimizer.lr", [1e-4, 2e-4, 4e-4, 8e-4, 1e-3, 2e-3, 4e-3, 8e-3, 0.01, 0.02, 0.04, 0.08, 0.1, 0.2, 0.4]),
    "weight_decay": ("optimizer.weight_decay", [float(f"{v:.2g}") for v in np.geomspace(1e-6, 1e-2, 18)]),
    "momentum": ("optimizer.momentum", [0.8, 0.85, 0.89, 0.9, 0.95, 0.99]),
    "batch_size": ("train.batch_size", [32, 64, 128, 256, 512, 1024, 2048]),
}
DEPLOYMENTS = ("centralized", "deep_ensemble", "distributed_iid", "distributed_dirichlet")


def cells(params, deployments, nodes, seeds, grids, overrides) -> list[Cell]:
    out = []
    for dep in deployments:
        ns = [1] if dep == "centralized" else [n for n in nodes if n > 1]
        for n in ns:
            for seed in seeds:
                for param in params:
                    key, values = grids[param]
                    for v in values:
                        name = f"{param}={v:g}-{dep}-N{n}-seed{seed}"
                        ov = [f"deployment={dep}", f"deployment.num_nodes={n}", f"train.seed={seed}", f"{key}={v}",
                              *SWEEP_DEFAULTS, *overrides]
                        out.append(Cell(name, ov, param, v))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sweeps/rq12")
    p.add_argument("--params", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    p.add_argument("--deployments", nargs="+", default=list(DEPLOYMENTS), choices=DEPLOYMENTS)
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 3, 5, 7])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--max-failures", type=int, default=3,
                   help="cells that may fail or be lost with their worker before the sweep stops")
    p.add_argument("--cpus-per-cell", type=float, default=1.0)
    p.add_argument("--address", default=None, help="Ray cluster address (default: a local instance)")
    for name, (_, values) in GRIDS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=float, nargs="+", default=values, dest=f"grid_{name}",
                       help=f"grid for {name}")
    own, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(own)
    grids = {k: (key, [int(v) if k == "batch_size" else v for v in getattr(args, f"grid_{k}")])
             for k, (key, _) in GRIDS.items()}
    setup_logging()
    rows = run_sweep("rq12", cells(args.params, args.deployments, args.nodes, args.seeds, grids, overrides), args.out,
                     max_concurrent=args.max_concurrent, max_failures=args.max_failures,
                     cpus_per_cell=args.cpus_per_cell, address=args.address,
                     progress=sys.stderr.isatty())
    return 0 if all(r["status"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(guarded(main, "the sweep directory is kept (finished cells in cells.csv); run the same command to resume", prog="rq12"))
