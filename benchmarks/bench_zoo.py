"""What a cheaper surrogate zoo costs the transfer attacks: zoo training time against CWA's strength.

For each ``--epochs`` value, the data set's default zoo is trained (or found in
this benchmark's own cache) with ``attack.surrogate_epochs`` set to it, then
the run's ensemble is attacked on the evaluation sample (the run's config,
``attack.num_samples`` test images at ``attack.eps``) with each transfer attack
(CWA, MI-FGSM, PGD on the zoo; the examples replayed on the ensemble). A lower
robust accuracy is a stronger attack. Every zoo attacks the same ensemble and
the same images, so the rows differ only by the zoo.

Usage: python benchmarks/bench_zoo.py RUN_DIR [--epochs 5 3 2 1] [--out benchmarks/out/zoo]
(RUN_DIR: a trained run, e.g. ``fedrobust train data=fashion_mnist run_dir=runs/fmnist``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fedrobust.attacks import accuracy, predict
from fedrobust.attacks.gradient import CWA, MIFGSM, PGD
from fedrobust.data import dataset_of, to_float
from fedrobust.evaluation.stages import batched
from fedrobust.evaluation.surrogates import load_or_train_zoo
from fedrobust.run import setup_logging
from fedrobust.runs.images import evaluation_images
from fedrobust.runs.members import load_ensemble
from fedrobust.stats import interval_of


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--epochs", type=int, nargs="+", default=[5, 3, 2, 1])
    p.add_argument("--out", default="benchmarks/out/zoo", help="the zoos' cache and results.json")
    args = p.parse_args()
    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = OmegaConf.load(Path(args.run_dir) / "config.yaml")
    data = dataset_of(base)
    target = load_ensemble(args.run_dir, "cpu", base).eval()
    images = evaluation_images(base, data)
    xs, y = images.tensors(data)
    x = to_float(xs)
    clean = predict(target, x) == y
    a = base.attack
    rows = []
    for epochs in args.epochs:
        cfg = OmegaConf.merge(base, {"attack": {"surrogate_epochs": epochs, "cache_dir": str(out / "cache")},
                                     "train": {"progress": False}})
        t0 = time.perf_counter()
        zoo, key, cached = load_or_train_zoo(cfg, data, torch.device("cpu"))
        seconds = time.perf_counter() - t0
        row = {"epochs": epochs, "zoo_seconds": None if cached else round(seconds, 1), "zoo": key,
               "surrogate_clean_accuracy": accuracy(zoo, x, y)}
        attacks = {"cwa": CWA(list(zoo.members), a.eps, a.transfer_steps, loss=a.transfer_loss),
                   "mifgsm": MIFGSM(zoo, a.eps, a.transfer_steps, loss=a.transfer_loss, worst_case=False),
                   "pgd": PGD(zoo, a.eps, a.transfer_steps, loss=a.transfer_loss, seed=a.seed, worst_case=False)}
        for name, attack in attacks.items():
            x_adv = batched(attack, x, y, a.batch_size)
            robust = (predict(target, x_adv) == y) & clean
            ra = float(robust.float().mean())
            row[name] = {"robust_accuracy": ra, "interval": interval_of(ra, len(y))}
        rows.append(row)
        (out / "results.json").write_text(json.dumps({"run": str(args.run_dir), "eps": a.eps, "images": len(y),
                                                      "rows": rows}, indent=2))
    print(f"{args.run_dir}: {len(y)} test images at eps {a.eps:g}, ensemble clean accuracy {float(clean.float().mean()):.3f}")
    print("| zoo epochs | zoo training | surrogates' clean accuracy | RA_T CWA | MI-FGSM | PGD |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        secs = "cached" if r["zoo_seconds"] is None else f"{r['zoo_seconds']:.0f} s"
        cells = " | ".join(f"{r[n]['robust_accuracy']:.3f} [{r[n]['interval'][0]:.3f}, {r[n]['interval'][1]:.3f}]"
                           for n in ("cwa", "mifgsm", "pgd"))
        print(f"| {r['epochs']} | {secs} | {r['surrogate_clean_accuracy']:.3f} | {cells} |")


if __name__ == "__main__":
    main()
