"""AdvRush's claim at our scale (docs/arch-search.md): are the genotypes that the smoothness
penalty searches smoother and more robust than plain DARTS's, and than a hand-made CNN of similar size?

1. Searches (``fedrobust search-arch``, ``arch_search=small``): gamma 0 (DARTS, the paper's baseline) and
   gamma > 0 (AdvRush) at each search seed (the seed also picks the split of the training images).
2. Each genotype and the hand-made model trained under plain training at each training seed
   (``fedrobust train``: one member, ``deployment=centralized``, ``engine=inline``), then evaluated
   (``evaluate=true``): clean accuracy on the whole test set; on a fixed test sample, PGD and APGD
   (white box), RA_T (CWA with the 28x28 surrogate zoo) and RA_Q (Square), and the input-Hessian
   lambda_max. Every robust accuracy is the worst case over every point the attack evaluated.

A finished search or run is skipped, so the same command resumes. It writes ``OUT/summary.md`` (per
genotype and per group: mean, standard deviation and the values) and ``OUT/summary.png``; ``--docs
NAME`` copies the figure to ``docs/NAME.png``.

Usage: python simulations/arch_search.py [--out searches/arch] [--search-seeds 0 1] [--train-seeds 0 1 2]
       [--gamma 0.1] [--hand-made lenet] [--docs NAME] [train overrides...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedrobust.atomic import save_figure, write_text  # noqa: E402

# the zoo's 5 epochs: the protocol the published figures were measured with (attack=fashion_mnist trains 1 since)
DATA = ["data=fashion_mnist", "data.root=null", "attack.surrogate_epochs=5"]
# the protocol (docs/arch-search.md): a fixed stratified subset of 6,000 images, 4 epochs, 100 test images at eps 0.05
# (as simulations/fashion_mnist.py): sized so that 15 runs take about 40 minutes on 2 cores
TRAIN = ["data.train_subset=6000", "deployment=centralized", "engine=inline", "strategy=plain", "train.epochs=4",
         "train.progress=false", "evaluate=true", "attack.eps=0.05", "attack.num_samples=100",
         "attack.transfer_attacks=[cwa]", "attack.query_attacks=[square_linf]", "attack.queries=300",
         "attack.whitebox=[pgd,apgd]", "attack.whitebox_steps=20", "attack.apgd_steps=50",
         "attack.hessian_samples=30", "attack.power_iters=10"]
METRICS = [("clean", "clean accuracy"), ("pgd", "PGD-20"), ("apgd", "APGD-50"), ("ra_t", "RA_T (CWA)"),
           ("ra_q", "RA_Q (Square)"), ("lambda_max", "lambda_max")]


def _run(cmd: list[str], log: Path) -> None:
    t0 = time.perf_counter()
    with log.open("a") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"arch_search: {' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")
    print(f"  done in {time.perf_counter() - t0:.0f}s: {' '.join(cmd[2:4])}", flush=True)


def search(out: Path, name: str, gamma: float, seed: int) -> Path:
    folder = out / "searches" / name
    if not (folder / "genotype.json").is_file():
        print(f"search {name}", flush=True)
        _run([sys.executable, "-m", "fedrobust.cli", "search-arch", str(folder), *DATA, "arch_search=small",
              f"arch_search.gamma={gamma}", f"arch_search.seed={seed}", f"arch_search.split_seed={seed}",
              "arch_search.progress=false"], out / "searches.log")
    return folder / "genotype.json"


def train(out: Path, label: str, model: str, seed: int, extra: list[str]) -> dict:
    run_dir = out / "runs" / f"{label}-t{seed}"
    results = run_dir / "results.json"
    if not (results.is_file() and "evaluation" in json.loads(results.read_text())):
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an unfinished run: start it again
        print(f"train {label} seed {seed}", flush=True)
        _run([sys.executable, "-m", "fedrobust.cli", "train", *DATA, *TRAIN, f"model={model}", f"train.seed={seed}",
              f"run_dir={run_dir}", f"attack.cache_dir={out / 'cache'}", *extra], out / "runs.log")
    r = json.loads(results.read_text())
    e = r["ensemble"]
    member = run_dir / "members"
    params = None
    import torch

    for path in sorted(member.glob("member_*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        params = sum(v.numel() for k, v in state.items() if hasattr(v, "numel") and not k.endswith(
            ("running_mean", "running_var", "num_batches_tracked", ".mean", ".std")))
        break
    return {"label": label, "seed": seed, "clean": e["clean_accuracy"],
            "pgd": e["attacks"]["whitebox_pgd"]["robust_accuracy"], "apgd": e["attacks"]["whitebox_apgd"]["robust_accuracy"],
            "ra_t": e["robust_accuracy"]["transfer"], "ra_q": e["robust_accuracy"]["query"],
            "lambda_max": e["smoothness"]["lambda_max"]["mean"], "params": params}


def _stats(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def summary(out: Path, rows: list[dict], searches: dict[str, dict], groups: dict[str, list[str]]) -> str:
    lines = ["| group | runs | params | " + " | ".join(t for _, t in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for group, labels in groups.items():
        rs = [r for r in rows if r["label"] in labels]
        params = sorted({r["params"] for r in rs})
        lines.append(f"| **{group}** | {len(rs)} | {', '.join(f'{p:,}' for p in params)} | "
                     + " | ".join(_stats([r[k] for r in rs]) for k, _ in METRICS) + " |")
        if len(labels) > 1:
            for label in labels:
                rl = [r for r in rs if r["label"] == label]
                lines.append(f"| {label} | {len(rl)} | {rl[0]['params']:,} | "
                             + " | ".join(_stats([r[k] for r in rl]) for k, _ in METRICS) + " |")
    lines += ["", "Searches (supernet, last epoch; L_lambda and lambda_max on the fixed probe images):", "",
              "| search | gamma | seconds | val accuracy | L_lambda | lambda_max | normal cell | reduction cell |",
              "|---|---|---|---|---|---|---|---|"]
    for name, s in searches.items():
        g = s["genotype"]
        cell = lambda genes: ", ".join(f"{op}<-{j}" for op, j in genes)  # noqa: E731
        lines.append(f"| {name} | {g['search']['gamma']} | {g['search']['seconds']:.0f} | {float(s['last']['val_acc']):.3f} "
                     f"| {float(s['last']['probe_penalty']):.3g} | {float(s['last']['lambda_max']):.3g} | "
                     f"{cell(g['normal'])} | {cell(g['reduce'])} |")
    lines += ["", "Every run: " + " ".join(f"{r['label']}-t{r['seed']}: " + ", ".join(f"{k} {r[k]:.4g}" for k, _ in METRICS)
                                          for r in rows)]
    return "\n".join(lines) + "\n"


def plot(out: Path, rows: list[dict], groups: dict[str, list[str]]) -> Path:
    from fedrobust.views import _pyplot

    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [5, 1.4]})
    keys = [k for k, _ in METRICS if k != "lambda_max"]
    width = 0.8 / len(groups)
    for i, (group, labels) in enumerate(groups.items()):
        rs = [r for r in rows if r["label"] in labels]
        means = [statistics.fmean(r[k] for r in rs) for k in keys]
        sds = [statistics.stdev([r[k] for r in rs]) if len(rs) > 1 else 0 for k in keys]
        ax.bar([j + i * width for j in range(len(keys))], means, width, yerr=sds, capsize=3, label=f"{group} ({len(rs)} runs)")
        lam = [r["lambda_max"] for r in rs]
        ax2.bar(i, statistics.fmean(lam), yerr=statistics.stdev(lam) if len(lam) > 1 else 0, capsize=3)
    ax.set_xticks([j + width * (len(groups) - 1) / 2 for j in range(len(keys))], [t for k, t in METRICS if k in keys])
    ax.set_ylabel("accuracy (mean ± sd over runs)")
    ax.legend(fontsize=7)
    ax2.set_xticks(range(len(groups)), list(groups), rotation=20, fontsize=7)
    ax2.set_ylabel("input-Hessian lambda_max")
    ax2.set_title("lower: smoother", fontsize=8)
    fig.suptitle("Fashion-MNIST, plain training: searched genotypes against a hand-made CNN")
    fig.tight_layout()
    path = out / "summary.png"
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="searches/arch")
    p.add_argument("--search-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--hand-made", default="lenet")
    p.add_argument("--docs")
    p.add_argument("overrides", nargs="*", help="extra fedrobust train overrides for every run")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    genotypes = {}
    for gamma, kind in ((args.gamma, "advrush"), (0.0, "darts")):
        for seed in args.search_seeds:
            genotypes[f"{kind}-s{seed}"] = search(out, f"{kind}-s{seed}", gamma, seed)
    rows = []
    for seed in args.train_seeds:
        rows.append(train(out, args.hand_made, args.hand_made, seed, args.overrides))
        for name, path in genotypes.items():
            rows.append(train(out, name, f"searched:{path}", seed, args.overrides))
    searches = {}
    for name, path in genotypes.items():
        import csv

        hist = list(csv.DictReader((path.parent / "history.csv").open()))
        searches[name] = {"genotype": json.loads(path.read_text()), "last": hist[-1]}
    groups = {f"hand-made ({args.hand_made})": [args.hand_made],
              "DARTS (gamma 0)": [n for n in genotypes if n.startswith("darts")],
              f"AdvRush (gamma {args.gamma:g})": [n for n in genotypes if n.startswith("advrush")]}
    text = summary(out, rows, searches, groups)
    write_text(out / "summary.md", text + f"\nWall time of this command: {time.perf_counter() - t0:.0f}s\n")
    fig = plot(out, rows, groups)
    if args.docs:
        shutil.copy(fig, ROOT / "docs" / f"{args.docs}.png")
    print(text)


if __name__ == "__main__":
    main()
