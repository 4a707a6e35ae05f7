"""``fedrobust report DIR``: plots and a Markdown summary of a study (``fedrobust tune``) or a sweep (``simulations/``).

Sweeps: one figure per swept hyperparameter with RA_T, RA_Q and clean
accuracy against its value, one line per deployment, averaged over seeds
and numbers of nodes as the main paper does (the band is ± one standard
deviation). Studies: the Pareto front and the recommended configurations,
each front trial with its validation figures (what the study selected on)
next to its figures on the test sample, measured once (:mod:`.holdout`).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..atomic import save_figure, write_text
from . import outputs

__all__ = ["report", "sweep_table"]

LOG_X = {"lr", "weight_decay", "batch_size"}
METRICS = (("ra_t", "RA_T (transfer)"), ("ra_q", "RA_Q (query)"), ("ca", "clean accuracy"))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def sweep_table(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[Any, dict[str, tuple[float, float, int]]]]]:
    """param -> deployment -> value -> metric -> (mean, std, n) over seeds and node counts."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for r in rows:
        if r.get("status") != "done":
            continue
        for key, _ in METRICS:
            acc[r["param"]][r["deployment"]][r["value"]][key].append(float(r[key]))
    out: dict = {}
    for param, by_dep in acc.items():
        out[param] = {}
        for dep, by_value in by_dep.items():
            out[param][dep] = {}
            for value in sorted(by_value):
                out[param][dep][value] = {k: (*_mean_std(v), len(v)) for k, v in by_value[value].items()}
    return out


def _plot_sweep(path: Path, param: str, by_dep: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for dep, by_value in sorted(by_dep.items()):
        xs = list(by_value)
        for ax, (key, label) in zip(axes, METRICS):
            m = [by_value[x][key][0] for x in xs]
            s = [by_value[x][key][1] for x in xs]
            ax.plot(xs, m, "-o", label=dep, markersize=4)
            ax.fill_between(xs, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.15)
            ax.set_ylabel(label)
    for ax in axes:
        ax.set_xlabel(param)
        if param in LOG_X:
            ax.set_xscale("log", base=2 if param == "batch_size" else 10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)
    plt.close(fig)


def _sweep_report(d: Path) -> str:
    rows = outputs.read_trials_csv(d / "cells.csv")
    name = _read_json(d / "sweep.json").get("name", d.name) if (d / "sweep.json").is_file() else d.name
    done = sum(r["status"] == "done" for r in rows)
    table = sweep_table(rows)
    lines = [f"# Sweep {name}", "", f"{done}/{len(rows)} cells done. Each value: mean ± std over seeds and node counts.", ""]
    for param, by_dep in table.items():
        png = d / f"sweep_{param}.png"
        _plot_sweep(png, param, by_dep)
        lines += [f"## {param}", "", f"![{param}]({png.name})", ""]
        deps = sorted(by_dep)
        lines.append(f"| {param} | " + " | ".join(f"{dep}: RA_T / RA_Q / CA" for dep in deps) + " |")
        lines.append("|" + "---|" * (len(deps) + 1))
        values = sorted({v for dep in deps for v in by_dep[dep]})
        for v in values:
            cells = []
            for dep in deps:
                e = by_dep[dep].get(v)
                cells.append("–" if e is None else " / ".join(f"{e[k][0]:.4f}" for k, _ in METRICS))
            lines.append(f"| {outputs._value(v)} | " + " | ".join(cells) + " |")
        lines.append("")
    text = "\n".join(lines)
    write_text(d / "report.md", text)
    return text


def _test_figures(d: Path, rows: list[dict[str, Any]], objectives: str) -> str:
    """Evaluate the front's trials on the test sample where that was not done yet (once: it is kept); a note for
    report.md if it could not be done now."""
    from .holdout import evaluate_front, load_study_config, test_scores, trial_dir
    from .study import StudyLocked, study_lock

    front = []
    for r in outputs.front_rows(rows, objectives):
        run_dir = trial_dir(d, r["number"], r.get("run_dir"))
        scores = test_scores(run_dir) if run_dir.is_dir() else None
        if scores is not None:
            r.update(scores)
        elif run_dir.is_dir() or not outputs.has_test(r):  # a copy of the study without its trials keeps trials.csv's
            front.append(r)
    if not front:
        return ""
    try:
        with study_lock(d):  # never while the study runs: its trials must not be chosen with test figures in view
            scores = evaluate_front(d, load_study_config(d), front)
    except StudyLocked:
        return "The study is running: its front is evaluated on the test sample when it ends."
    for r in rows:
        r.update(scores.get(r["number"], {}))
    missing = [r["number"] for r in front if r["number"] not in scores]
    return f"Not evaluated on the test sample (run directory missing): trial(s) {missing}." if missing else ""


def _study_report(d: Path) -> str:
    rows = outputs.read_trials_csv(d / "trials.csv")
    header = list(rows[0]) if rows else []
    params = header[header.index("state") + 1 : header.index("ca")] if rows else []
    pareto = _read_json(d / "pareto.json")
    objectives = "accuracy" if pareto["objectives"][0] == "val_accuracy" else "robustness"
    title = d.name
    note = _test_figures(d, rows, objectives)
    measured = outputs.measured_on(d, rows, objectives)
    outputs.write_trials_csv(d / "trials.csv", rows, params)
    outputs.write_pareto(d / "pareto.json", rows, params, objectives, pareto["baseline_accuracy"], pareto["min_accuracy"],
                         measured)
    outputs.plot_front(d, rows, objectives, title)
    front = outputs.front_rows(rows, objectives)
    rec = outputs.write_recommended(d / "recommended.md", front, params, title, pareto["baseline_accuracy"],
                                    pareto["min_accuracy"], measured)
    states = defaultdict(int)
    for r in rows:
        states[r["state"]] += 1
    counts = "Trials: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())) + "."
    if "rung" in header:  # a multi-fidelity study: a row per trial and rung
        by_rung, epochs = defaultdict(int), {}
        for r in rows:
            if r["state"] == "COMPLETE":
                by_rung[r["rung"] or 0] += 1
                epochs[r["rung"] or 0] = r["budget_epochs"]
        counts += " Completed per rung (lowest budget first): " + ", ".join(
            f"{by_rung[k]} at {epochs[k]} epochs" for k in sorted(by_rung)) + "; only the full budget's can be on the front."
    lines = [f"# Study {title}", "", counts, "", "![Pareto front](pareto.png)", "", rec.split("\n", 2)[2]]
    if note:
        lines += [note, ""]
    text = "\n".join(lines)
    write_text(d / "report.md", text)
    return text


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"path: {path} is damaged or partial ({type(exc).__name__}: {exc})") from None


def _is_study(d: Path) -> bool:
    return (d / "trials.csv").is_file() and (d / "pareto.json").is_file()


def _studies_report(d: Path, studies: list[Path]) -> str:
    """Several studies side by side (``simulations/rq3.py``: one per deployment), like the paper's Fig. 4."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    lines = [f"# Studies in {d.name}", "", "![Pareto fronts](pareto_fronts.png)", ""]
    for sd in studies:
        _study_report(sd)
        rows = outputs.read_trials_csv(sd / "trials.csv")
        pareto = _read_json(sd / "pareto.json")
        objectives = "accuracy" if pareto["objectives"][0] == "val_accuracy" else "robustness"
        pts = sorted(outputs.objective_values(r, objectives) for r in outputs.front_rows(rows, objectives))
        if pts:
            ax.plot(*zip(*pts), "-o", label=sd.name, markersize=4)
        names = pareto["objectives"]
        lines += [f"## {sd.name}", "", f"[report]({sd.name}/report.md) · {len(pts)} configuration(s) on the front", ""]
    ax.set_xlabel(outputs.LABELS[names[0]])
    ax.set_ylabel(outputs.LABELS[names[1]])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("feasible Pareto fronts (validation images)")
    fig.tight_layout()
    save_figure(fig, d / "pareto_fronts.png", dpi=150)
    plt.close(fig)
    text = "\n".join(lines)
    write_text(d / "report.md", text)
    return text


def report(d: Path) -> str:
    """Render the directory's plots and ``report.md``; return the Markdown."""
    if (d / "cells.csv").is_file():
        return _sweep_report(d)
    if _is_study(d):
        return _study_report(d)
    studies = sorted(p for p in d.iterdir() if p.is_dir() and _is_study(p)) if d.is_dir() else []
    if studies:
        return _studies_report(d, studies)
    raise ConfigError(f"path: {d} is neither a study directory (trials.csv, pareto.json), a folder of studies, "
                      "nor a sweep (cells.csv)")
