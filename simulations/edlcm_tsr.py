"""EDLCM against plain training: member-to-member TSR (EDLCM eq. 12) at equal seeds.

Trains (or reuses) two digits ensembles with the default deployment
(distributed_dirichlet, 3 nodes), one with ``strategy=plain`` and one with
``strategy=edlcm``, same training seeds, then prints the TSR between members
(PGD, 10 steps) at several budgets, and each ensemble's clean accuracy.

``--grad fd exact`` trains EDLCM with each way of computing the penalty's
weight gradient (``strategy.grad``: four first-order passes, or double
backpropagation) to compare them at the same seeds. ``--every 1 2`` also
trains EDLCM in its lazy form (``strategy.every=2``: the regulariser on one
batch in two, scaled by two).

Usage: python simulations/edlcm_tsr.py [--out runs/edlcm_tsr] [--seeds 0 1 2] [--grad fd exact] [--every 1 2]
       [extra train overrides...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fedrobust.cli import main as fedrobust
from fedrobust.data import load_dataset, to_float
from fedrobust.attacks import PGD
from fedrobust.attacks import transferability
from fedrobust.interrupt import guarded
from fedrobust.runs.members import load_ensemble

EPS = (4 / 255, 8 / 255, 16 / 255, 0.1)


def tsr(run_dir: Path, eps: float) -> float:
    ens = load_ensemble(run_dir)
    data = load_dataset("digits")
    x, y = to_float(data.x_test), data.y_test
    value, _ = transferability(list(ens.members), x, y, lambda m: PGD(m, eps, 10, seed=0, worst_case=False))
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/edlcm_tsr")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--every", type=int, nargs="+", default=[1], help="EDLCM strategy.every values to train")
    p.add_argument("--grad", nargs="+", default=["fd"], choices=["fd", "exact"], help="EDLCM strategy.grad values to train")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(2)
    rows = []
    for seed in args.seeds:
        cells = [("plain", "plain", ["strategy=plain"])] + [  # label, run directory stem, overrides
            ("edlcm" + (f"/{k}" if k > 1 else "") + f" {grad}", "edlcm" + (f"-every{k}" if k > 1 else "") + f"-{grad}",
             ["strategy=edlcm", f"strategy.every={k}", f"strategy.grad={grad}"])
            for grad in args.grad for k in args.every
        ]
        for strategy, stem, extra in cells:
            run = Path(args.out) / f"{stem}-seed{seed}"
            if not (run / "results.json").is_file():  # resumable: finished cells are skipped
                code = fedrobust(["train", "engine=inline", f"train.seed={seed}",
                                  "train.progress=false", *extra, *args.overrides, f"run_dir={run}"])
                if code != 0:
                    raise SystemExit(code)
            acc = json.loads((run / "results.json").read_text())["ensemble"]["clean_accuracy"]
            rows.append((strategy, seed, acc, [tsr(run, e) for e in EPS]))
    print("edlcm/k: strategy.every=k (lazy regularisation); fd | exact: strategy.grad")
    head = f"{'strategy':15s} {'seed':>4s} {'clean':>6s} " + " ".join(f"TSR@{e:.4f}".rjust(12) for e in EPS)
    print(head)
    for strategy, seed, acc, values in rows:
        print(f"{strategy:15s} {seed:4d} {acc:6.4f} " + " ".join(f"{v:12.2f}" for v in values))


if __name__ == "__main__":
    sys.exit(guarded(lambda: main() or 0, "finished runs are kept in their run directories", prog="edlcm_tsr"))
