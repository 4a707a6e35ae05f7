"""Nodes that cheat: how the ensemble's defences hold on Fashion-MNIST (issue 42; docs/cheating.md).

The protocol, sized for about an hour on 2 cores:

- Fashion-MNIST, a fixed stratified subset of 20,000 training images
  (``data.train_subset``), of which the server keeps 500 for itself
  (``deployment.server_images``: no node ever holds them) and 5 nodes share
  the rest, Dirichlet(0.9), partition seed 123; LeNet-5 members, at most 20
  epochs with early stopping, the rest of the defaults; 2 training seeds.
- 0, 1 or 2 malicious nodes (node 0; nodes 0 and 1), each behaviour of
  :mod:`fedrobust.behaviours` at its defaults (``scale``: logits x100 and
  rolled by one class; ``label_flip``; ``backdoor``: 10 % of the node's
  images get a white 3x3 patch in the bottom-right corner and label 0;
  ``free_rider``).
- Each defence on the same trained members: the five combination rules
  (``ensemble.combine``; ``trimmed_mean_probs`` trims 1 member per side) and
  screening on the server's 500 images (``ensemble.screen``, defaults,
  with the mean of the logits).
- Figures: clean accuracy on the whole test set (10,000 images), the
  backdoor's attack success rate on every test image of another class than
  the target, and RA_T (CWA with the 28x28 zoo, 1 epoch) and RA_Q (Square
  L-inf, 500 queries) at the default budget (eps 0.1) on 500 test images
  (seed 0). Each cell's figure is the mean over the seeds, with a 95% Wilson
  interval over the pooled images of both seeds (the sampling of test
  images; the seeds' spread is given beside it).

Training cells run as Ray tasks two at a time (:func:`fedrobust.tuning.sweep.run_sweep`), each evaluated with the
default rule; then every other defence is evaluated on the same members, a cell's defences in a process of
its own, two cells at a time (a rule's evaluation
goes to ``CELL/defence-RULE/``; screening builds ``CELL/defence-screening/`` with the members it keeps). A
finished cell or defence is skipped, so the same command resumes an interrupted run. At the end it writes
``OUT/findings.md`` and ``OUT/cheating.png``; ``--docs DIR`` copies the figure there.

Usage: python simulations/cheating_nodes.py [--out sweeps/cheating] [--seeds 0 1] [--docs docs] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from fedrobust.atomic import save_figure, write_json, write_text
from fedrobust.run import setup_logging
from fedrobust.tuning.study import pin_cache_dir
from fedrobust.tuning.sweep import SWEEP_DEFAULTS, Cell, run_sweep, split_overrides

PROTOCOL = [
    "data=fashion_mnist", "data.train_subset=20000", "train.epochs=20", "deployment=distributed_dirichlet",
    "deployment.num_nodes=5", "deployment.alpha=0.9", "deployment.server_images=500", "engine.on_missing=min_members",
    "attack.num_samples=500", "attack.per_member=false", "attack.transfer_attacks=[cwa]",
    "attack.query_attacks=[square_linf]",
]
BEHAVIOURS = ("scale", "label_flip", "backdoor", "free_rider")
CHEATERS = {1: [0], 2: [0, 1]}  # how many malicious nodes -> which
DEFENCES = {
    "mean_logits": [],
    "mean_probs": ["ensemble.combine=mean_probs"],
    "median_probs": ["ensemble.combine=median_probs"],
    "trimmed_mean_probs": ["ensemble.combine=trimmed_mean_probs", "ensemble.trim=1"],
    "majority_vote": ["ensemble.combine=majority_vote"],
    "screening": ["ensemble.screen=true"],
}
METRICS = (("ca", "clean accuracy (10,000 test images)"), ("asr", "backdoor attack success rate"),
           ("ra_t", "RA_T (CWA, eps 0.1, 500 images)"), ("ra_q", "RA_Q (Square L-inf, eps 0.1, 500 images)"))


def configurations() -> dict[str, list[str]]:
    """Configuration label -> its deployment.malicious override (none for the honest one)."""
    out = {"honest": []}
    for behaviour in BEHAVIOURS:
        for k, nodes in CHEATERS.items():
            entries = ",".join(f"{{node:{n},behaviour:{behaviour}}}" for n in nodes)
            out[f"{behaviour}-x{k}"] = [f"deployment.malicious=[{entries}]"]
    return out


def cells(seeds: list[int], extra: list[str]) -> list[Cell]:
    return [Cell(f"{label}-seed{seed}", [*SWEEP_DEFAULTS, *PROTOCOL, f"train.seed={seed}", *malicious, *extra],
                 "configuration", label, {"seed": seed})
            for label, malicious in configurations().items() for seed in seeds]


def _screened_dir(cell_dir: Path, cfg, data) -> tuple[Path, list[dict[str, Any]]]:
    """``CELL/defence-screening``: the cell's run with only the members the server's screening keeps (the
    library's own rule, :func:`fedrobust.screening.screen`), and the verdicts."""
    import torch
    from omegaconf import OmegaConf

    from fedrobust.runs.members import load_member, member_files
    from fedrobust.node import build_member
    from fedrobust.screening import screen, server_images

    out = cell_dir / "defence-screening"
    verdict_file = out / "screening.json"
    if verdict_file.is_file():
        return out, json.loads(verdict_file.read_text())
    results = json.loads((cell_dir / "results.json").read_text())
    node_of = {m["member"]: m["node"] for m in results["members"]}
    files = member_files(cell_dir)
    ids = [int(p.stem.split("_")[1]) for p in files]
    models = [load_member(p, build_member(cfg, data)).eval() for p in files]
    _, x, y = server_images(cfg, data)
    with torch.no_grad():
        verdicts = screen(models, ids, [node_of[m] for m in ids], x, y, cfg.ensemble.min_accuracy,
                          cfg.ensemble.max_scale_mads)
    if out.exists():
        shutil.rmtree(out)
    (out / "members").mkdir(parents=True)
    for p, v in zip(files, verdicts):
        if v.reason is None:
            os.link(p, out / "members" / p.name)
    keep = {v.member for v in verdicts if v.reason is None}
    for key in ("evaluation", "attack_config"):  # the training part only: the evaluation comes next
        results.pop(key, None)
    results["ensemble"] = {k: v for k, v in results["ensemble"].items()
                           if k in ("clean_accuracy", "clean_accuracy_interval", "num_test_samples", "combine")}
    results["members"] = [{k: v for k, v in m.items() if not k.startswith(("robust", "unions"))}
                          for m in results["members"] if m["member"] in keep]
    results["ensemble"]["num_members"] = len(keep)
    results["screening"] = {"server_images": len(y), "members": [v.as_dict() for v in verdicts]}
    write_json(out / "results.json", results)
    write_text(out / "config.yaml", OmegaConf.to_yaml(cfg))
    write_json(verdict_file, [v.as_dict() for v in verdicts])
    return out, [v.as_dict() for v in verdicts]


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)
    setup_logging()


def evaluate_defences(cell: Cell, cell_dir: Path) -> list[dict[str, Any]]:
    """One row per defence of ``cell``: clean accuracy (whole test set), attack success rate, RA_T, RA_Q."""
    import torch

    from fedrobust.behaviours import Backdoor, build_behaviour, malicious_nodes
    from fedrobust.data import dataset_of
    from fedrobust.evaluation.evaluate import evaluate_run
    from fedrobust.poisoning import attack_success_rate
    from fedrobust.runs.members import load_ensemble
    from fedrobust.training import evaluate_model
    from fedrobust.validation import load_config

    rows = []
    for defence, keys in DEFENCES.items():
        cfg = load_config([*cell.overrides, *keys])
        pin_cache_dir(cfg)  # as the sweep's cells had it: the same zoo and transfer examples
        cfg.train.progress = False
        data = dataset_of(cfg)
        verdicts = None
        if defence == "screening":
            run_dir, verdicts = _screened_dir(cell_dir, cfg, data)
            results = json.loads((run_dir / "results.json").read_text())
            if "evaluation" not in results:
                results = evaluate_run(run_dir, cfg, data)
        elif defence == "mean_logits":
            run_dir, results = cell_dir, json.loads((cell_dir / "results.json").read_text())
        else:
            run_dir = cell_dir
            results = evaluate_run(cell_dir, cfg, data, into=f"defence-{defence}", reuse=True)
        ensemble = load_ensemble(run_dir, "cpu", cfg)
        x, y = data.x_test, data.y_test
        with torch.no_grad():
            _, ca = evaluate_model(ensemble, x, y)
        row = {"cell": cell.name, "configuration": cell.value, "seed": cell.meta["seed"], "defence": defence,
               "ca": ca, "n_ca": len(y), "ra_t": results["ensemble"]["robust_accuracy"]["transfer"],
               "ra_q": results["ensemble"]["robust_accuracy"]["query"],
               "n_ra": results["evaluation"]["num_samples"], "members": len(ensemble.members)}
        if verdicts is not None:
            row["rejected"] = [v["member"] for v in verdicts if not v["kept"]]
        for node, (name, options) in sorted(malicious_nodes(cfg.deployment.malicious).items()):
            b = build_behaviour(name, options, data.num_classes)
            if isinstance(b, Backdoor):
                asr, n = attack_success_rate(ensemble, b, x, y)
                row |= {"asr": asr, "n_asr": n}
                break
        if defence == "mean_logits":  # the cheating members' own clean accuracy, beside the ensemble's
            cheats = [m for m in results["members"] if "simulated_behaviour" in m]
            row["cheating_member_ca"] = [m["clean_accuracy"] for m in cheats]
        rows.append(row)
    return rows


def _cell_text(values: list[float], n_each: int) -> str:
    from fedrobust.stats import interval_of

    mean = statistics.fmean(values)
    ci = interval_of(mean, n_each * len(values))
    spread = f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""
    return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]{spread}" if ci else f"{mean:.3f}"


def tables(rows: list[dict[str, Any]]) -> list[str]:
    labels = list(configurations())
    lines = []
    for key, title in METRICS:
        n_key = {"ca": "n_ca", "asr": "n_asr"}.get(key, "n_ra")
        shown = [c for c in labels if any(r["configuration"] == c and key in r for r in rows)]
        if key == "asr":
            shown = [c for c in shown if c.startswith("backdoor") or c == "honest"]
        lines += [f"### {title}", "", "| configuration | " + " | ".join(DEFENCES) + " |",
                  "|---|" + "---|" * len(DEFENCES)]
        for c in shown:
            cells_ = []
            for d in DEFENCES:
                got = [r for r in rows if r["configuration"] == c and r["defence"] == d and key in r]
                cells_.append(_cell_text([r[key] for r in got], got[0][n_key]) if got else "-")
            lines.append(f"| {c} | " + " | ".join(cells_) + " |")
        lines.append("")
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(configurations())
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.6), sharey=False, gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(DEFENCES)
    for ax, key, title in ((axes[0], "ca", "clean accuracy"), (axes[1], "asr", "backdoor success rate")):
        shown = labels if key == "ca" else [c for c in labels if c.startswith("backdoor")]
        for j, d in enumerate(DEFENCES):
            means = []
            for c in shown:
                got = [r[key] for r in rows if r["configuration"] == c and r["defence"] == d and key in r]
                means.append(statistics.fmean(got) if got else float("nan"))
            ax.bar([i + (j - (len(DEFENCES) - 1) / 2) * width for i in range(len(shown))], means, width, label=d)
        ax.set_xticks(range(len(shown)), shown, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{title} (Fashion-MNIST, 5 nodes; mean of 2 seeds)" if key == "ca" else title, fontsize=9)
        ax.set_ylim(0, 1)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(DEFENCES), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sweeps/cheating")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--docs", default=None, help="copy the figure into this folder as cheating.png")
    own, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(own)
    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = cells(args.seeds, overrides)
    t0 = time.perf_counter()
    run_sweep("cheating_nodes", todo, out, max_concurrent=args.max_concurrent, progress=sys.stderr.isatty())
    t_train = time.perf_counter() - t0
    rows = []
    done = [(c, out.resolve() / "cells" / c.name) for c in todo if (out / "cells" / c.name / "results.json").is_file()]
    # the defences of each cell in a process of its own, max_concurrent at a time, one torch thread each
    with ProcessPoolExecutor(args.max_concurrent, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        try:
            for got in pool.map(evaluate_defences, [c for c, _ in done], [d for _, d in done]):
                rows += got
                write_json(out / "rows.json", rows)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    t_all = time.perf_counter() - t0
    honest = [r for r in rows if r["configuration"] == "scale-x1" and r["defence"] == "mean_logits"]
    lines = ["# Nodes that cheat: Fashion-MNIST, 5 nodes", "",
             "Protocol: simulations/cheating_nodes.py's docstring; extra overrides: " + (" ".join(overrides) or "none")
             + ". Each cell: mean over seeds " + ", ".join(map(str, args.seeds))
             + " [95% Wilson interval over the pooled images] (the seeds' range).", ""]
    if honest:
        lines += ["The scaled member's own clean accuracy (scale-x1, per seed): "
                  + ", ".join(f"{r['cheating_member_ca'][0]:.3f}" for r in honest)
                  + "; the mean_logits ensemble's: " + ", ".join(f"{r['ca']:.3f}" for r in honest) + ".", ""]
    screened = [r for r in rows if r["defence"] == "screening"]
    if screened:
        lines += ["Screening rejected (member ids per cell): "
                  + "; ".join(f"{r['cell']}: {r['rejected'] or 'none'}" for r in screened) + ".", ""]
    lines += tables(rows)
    lines += ["## Run time (this invocation; what was done already is not rerun)", "",
              f"- training cells (with the mean_logits evaluation): {t_train / 60:.1f} min",
              f"- in all: {t_all / 60:.1f} min", ""]
    write_text(out / "findings.md", "\n".join(lines))
    plot(rows, out / "cheating.png")
    if args.docs:
        shutil.copyfile(out / "cheating.png", Path(args.docs) / "cheating.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
