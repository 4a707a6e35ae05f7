"""The main paper's ablations: the number of nodes, and the data distribution (Dirichlet concentration).

* ``nodes``: N in ``--nodes`` for each distributed deployment and the deep
  ensemble, with the config's hyperparameters;
* ``alpha``: distributed_dirichlet with concentration in ``--alphas`` (small
  = more label skew).

Cells run on Ray and are skipped once done (see ``rq12.py``);
``fedrobust report OUT`` draws RA_T, RA_Q and CA against N and against alpha.

Usage: python simulations/ablations.py [--out sweeps/ablations] [--which nodes alpha] [--nodes 3 5 7]
       [--alphas 0.1 0.3 0.9 3 10] [--seeds 0 1 2] [--max-concurrent 2] [--max-failures 3] [overrides...]
"""

from __future__ import annotations

import argparse
import sys

from fedrobust.interrupt import guarded
from fedrobust.run import setup_logging
from fedrobust.tuning.sweep import SWEEP_DEFAULTS, Cell, run_sweep, split_overrides



def cells(which, nodes, alphas, seeds, overrides) -> list[Cell]:
    out = []
    for seed in seeds:
        if "nodes" in which:
            for dep in ("deep_ensemble", "distributed_iid", "distributed_dirichlet"):
                for n in nodes:
                    out.append(Cell(f"nodes={n}-{dep}-seed{seed}", [f"deployment={dep}", f"deployment.num_nodes={n}",
                                    f"train.seed={seed}", *SWEEP_DEFAULTS, *overrides], "num_nodes", n))
        if "alpha" in which:
            for a in alphas:
                out.append(Cell(f"alpha={a:g}-distributed_dirichlet-seed{seed}", [
                    "deployment=distributed_dirichlet", f"deployment.alpha={a}", f"train.seed={seed}",
                    *SWEEP_DEFAULTS, *overrides], "alpha", a))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sweeps/ablations")
    p.add_argument("--which", nargs="+", default=["nodes", "alpha"], choices=["nodes", "alpha"])
    p.add_argument("--nodes", type=int, nargs="+", default=[3, 5, 7])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.3, 0.9, 3.0, 10.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--max-failures", type=int, default=3,
                   help="cells that may fail or be lost with their worker before the sweep stops")
    p.add_argument("--cpus-per-cell", type=float, default=1.0)
    p.add_argument("--address", default=None)
    own, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(own)
    setup_logging()
    rows = run_sweep("ablations", cells(args.which, args.nodes, args.alphas, args.seeds, overrides), args.out,
                     max_concurrent=args.max_concurrent, max_failures=args.max_failures,
                     cpus_per_cell=args.cpus_per_cell, address=args.address,
                     progress=sys.stderr.isatty())
    return 0 if all(r["status"] == "done" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(guarded(main, "the sweep directory is kept (finished cells in cells.csv); run the same command to resume", prog="ablations"))
