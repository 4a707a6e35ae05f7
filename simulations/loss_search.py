"""AutoLoss-AR (paper 004) at several search seeds on one run: the tables of docs/loss-search.md.

For each seed, ``fedrobust search-loss RUN_DIR [overrides] loss_search.seed=K
loss_search.out_dir=OUT/seed_K`` (resumable: a finished seed is read back, its
held-out tables reused), then one summary over the seeds:

* ``OUT/summary.md``: per seed, the best loss by search fitness, its search
  fitness against cross-entropy's on the search images, and on held-out test
  images its PGD-10 robust accuracy against ce, margin and DLR, with the gap
  to ce in points; mean and standard deviation over the seeds; then PGD-100
  and APGD-100 for each seed's best loss next to the hand-made ones, and the
  transfer table (other members, other budgets);
* ``OUT/summary.png``: best search fitness so far per generation, one line per
  seed, against the hand-made losses' (copied to ``docs/`` with ``--docs NAME``).

Usage: python simulations/loss_search.py RUN_DIR --out OUT [--seeds 0 1 2] [--docs NAME] [loss_search.* overrides]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from fedrobust.interrupt import guarded

ROOT = Path(__file__).resolve().parents[1]


def _search(run_dir: str, out: Path, seed: int, overrides: list[str]) -> None:
    argv = [sys.executable, "-m", "fedrobust.cli", "search-loss", run_dir, *overrides, f"loss_search.seed={seed}",
            f"loss_search.out_dir={out}"]
    code = subprocess.call(argv)  # an argument list, never a shell string
    if code != 0:
        raise SystemExit(code)


def _name(column: str) -> str:
    """pgd10 -> PGD-10, apgd100 -> APGD-100."""
    letters = column.rstrip("0123456789")
    return f"{letters.upper()}-{column[len(letters):]}"


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def _gain_text(g: dict) -> str:
    low, high = g["interval_points"]
    p = "p < 0.001" if g["p_value"] < 0.001 else f"p {g['p_value']:.2g}"
    return f"{g['gain_points']:+.2f} [{low:+.2f}, {high:+.2f}], {p}"


def summarise(out: Path, seeds: list[int]) -> str:
    rows, long_rows, transfer = [], [], []
    for seed in seeds:
        d = out / f"seed_{seed}"
        held = json.loads((d / "heldout.json").read_text())
        fame = json.loads((d / "hall_of_fame.json").read_text())
        ckpt = json.loads((d / "checkpoint.json").read_text())
        table = {r["loss"]: r for r in held["table"]}
        best = held["table"][3]
        steps = [k for k in best if k.startswith("pgd")]
        short, long_, apgd = steps[0], steps[1], next(k for k in best if k.startswith("apgd"))
        gap = 100 * (table["ce"][short] - best[short])
        paired_gap = best.get("vs_ce", {}).get(short)  # tables measured before the paired test have none
        rows.append({"seed": seed, "infix": fame["entries"][0]["infix"], "fit": fame["entries"][0]["search_fitness"],
                     "gap_text": _gain_text(paired_gap) if paired_gap else f"{gap:+.2f}",
                     "fit_ce": fame["baselines"]["ce"], "ce": table["ce"][short], "margin": table["margin"][short],
                     "dlr": table["dlr"][short], "found": best[short], "gap": gap,
                     "seconds": ckpt["history"][-1]["seconds"], "generations": ckpt["generation"]})
        long_rows.append({"seed": seed, **{f"{n}_{c}": table[n][c] for n in ("ce", "margin", "dlr") for c in (long_, apgd)},
                          "found_long": best[long_], "found_apgd": best[apgd]})
        transfer.append({"seed": seed, "rows": held["transfer"]})
    first = json.loads((out / f"seed_{seeds[0]}" / "heldout.json").read_text())
    lines = [f"Held-out images: {first['images']['text']}; L-inf eps {first['eps']:g}; target {first['target']}; "
             f"robust accuracy with the worst case kept (lower = the loss breaks more).", "",
             f"| seed | best loss found (by search fitness) | search fitness (ce) | test {_name(short)}: ce | margin "
             f"| dlr | found | gap to ce (points) [95% interval], McNemar p | search time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | `{r['infix']}` | {r['fit']:.4f} ({r['fit_ce']:.4f}) | {r['ce']:.4f} | "
                     f"{r['margin']:.4f} | {r['dlr']:.4f} | {r['found']:.4f} | {r['gap_text']} | "
                     f"{r['seconds'] / 60:.1f} min |")
    lines += ["", f"Gap to ce over the seeds (points, mean ± std): {_mean_std([r['gap'] for r in rows])}.", "",
              f"| seed | ce {_name(long_)} / {_name(apgd)} | margin | dlr | found |", "|---|---|---|---|---|"]
    for r in long_rows:
        cell = lambda n: f"{r[f'{n}_{long_}']:.4f} / {r[f'{n}_{apgd}']:.4f}"  # noqa: E731
        lines.append(f"| {r['seed']} | {cell('ce')} | {cell('margin')} | {cell('dlr')} | "
                     f"{r['found_long']:.4f} / {r['found_apgd']:.4f} |")
    lines += ["", f"Transfer of each seed's best loss ({_name(short)}; gain = ce − found, points):", "",
              "| setting | " + " | ".join(f"seed {t['seed']}: ce → found" for t in transfer) + " |",
              "|---|" + "---|" * len(transfer)]
    for i, row in enumerate(transfer[0]["rows"]):
        cells = [f"{t['rows'][i]['ce']:.4f} → {t['rows'][i]['found']:.4f} "
                 f"({_gain_text(t['rows'][i]) if 'p_value' in t['rows'][i] else format(t['rows'][i]['gain_points'], '+.2f')})"
                 for t in transfer]
        lines.append(f"| {row['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(out: Path, seeds: list[int]) -> Path:
    from fedrobust.views import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    baselines = {}
    for seed in seeds:
        ckpt = json.loads((out / f"seed_{seed}" / "checkpoint.json").read_text())
        best, so_far = [], 1.0
        for h in ckpt["history"]:
            so_far = min(so_far, h["best"])
            best.append(so_far)
        ax.plot([h["generation"] for h in ckpt["history"]], best, "o-", ms=3, label=f"best so far, seed {seed}")
        baselines = ckpt["baselines"]
    for (name, value), style in zip(baselines.items(), (":", "-.", "--")):
        ax.axhline(value, color="grey", linestyle=style, label=f"{name}")
    ax.set_xlabel("generation")
    ax.set_ylabel("robust accuracy after PGD-10\n(search images)")
    ax.set_title("AutoLoss-AR search: lower is a stronger loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "summary.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--docs", help="also copy summary.png to docs/loss_search_NAME.png")
    p.add_argument("overrides", nargs="*", help="loss_search=PRESET and loss_search.KEY=VALUE")
    args = p.parse_intermixed_args()
    out = Path(args.out)
    for seed in args.seeds:
        _search(args.run_dir, out / f"seed_{seed}", seed, args.overrides)
    text = summarise(out, args.seeds)
    (out / "summary.md").write_text(text)
    figure = plot(out, args.seeds)
    if args.docs:
        shutil.copyfile(figure, ROOT / "docs" / f"loss_search_{args.docs}.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, "finished seeds are kept; run the same command to resume", prog="loss_search.py"))
