"""What a study leaves in its directory: trials.csv, pareto.json, recommended.md, plots, TensorBoard HParams."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_open, save_figure, write_json, write_text
from .space import SHORT_NAMES

__all__ = ["pareto_front", "write_trials_csv", "write_pareto", "write_recommended", "plot_front", "read_trials_csv",
           "measured_on"]

OBJECTIVE_NAMES = {"robustness": ("ra_t", "ra_q"), "accuracy": ("val_accuracy", "min_ra")}
LABELS = {"ra_t": "RA_T (transfer)", "ra_q": "RA_Q (query)", "val_accuracy": "validation accuracy",
          "min_ra": "min(RA_T, RA_Q)", "ca": "clean accuracy"}
# a front trial's figures on the test sample, measured once after the study (holdout.py)
TEST_COLUMNS = ("ca_test", "ra_t_test", "ra_q_test")
# each figure's 95% Wilson interval over its images: <figure>_low, <figure>_high
INTERVAL_COLUMNS = tuple(f"{f}_{end}" for f in ("ca", "val_accuracy", "ra_t", "ra_q", *TEST_COLUMNS)
                         for end in ("low", "high"))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (all objectives maximised)."""
    front = []
    for i, p in enumerate(points):
        dominated = any(
            all(a >= b for a, b in zip(q, p)) and any(a > b for a, b in zip(q, p)) for j, q in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return front


def _fmt(v: Any) -> Any:
    return "" if v is None else v


def write_trials_csv(path: Path, rows: list[dict[str, Any]], param_names: list[str]) -> None:
    """One row per trial: ca, val_accuracy, ra_t and ra_q on validation images (what the study selected on), and
    for the front's trials ca_test, ra_t_test and ra_q_test on the test sample (empty elsewhere). A multi-fidelity
    study has a row per trial and rung, with its budget (rung, budget_epochs, images; partial below the top)."""
    cols = ["number", "state", *param_names, "ca", "val_accuracy", "ra_t", "ra_q", *TEST_COLUMNS, *INTERVAL_COLUMNS,
            "feasible", "best_epoch", "duration_s", "requeued_from", "failure", "node", "run_dir"]
    if any(r.get("rung") is not None for r in rows):  # a multi-fidelity study: each row's budget
        cols[1:1] = ["rung", "budget_epochs", "images", "partial"]
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _fmt(r.get(c)) for c in cols})


def read_trials_csv(path: Path) -> list[dict[str, Any]]:
    def conv(v: str) -> Any:
        if v == "":
            return None
        if v in ("True", "False"):
            return v == "True"
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with open(path, newline="") as f:
        return [{k: conv(v) for k, v in row.items()} for row in csv.DictReader(f)]


def objective_values(row: dict[str, Any], objectives: str, test: bool = False) -> tuple[float, float]:
    """The row's objective values on validation images, or (``test``) on the test sample."""
    if test:
        if objectives == "accuracy":
            return row["ca_test"], min(row["ra_t_test"], row["ra_q_test"])
        return row["ra_t_test"], row["ra_q_test"]
    if objectives == "accuracy":
        return row["val_accuracy"], min(row["ra_t"], row["ra_q"])
    return row["ra_t"], row["ra_q"]


def has_test(row: dict[str, Any]) -> bool:
    return all(row.get(c) is not None for c in TEST_COLUMNS)


def measured_on(study_dir: Path, rows: list[dict[str, Any]], objectives: str) -> dict[str, str]:
    """What the figures were measured on, in words (from the first front trial that says so): ``ca`` and ``ra``
    (validation, what the study selected on), ``ca_test`` and ``ra_test`` (the front, on the test sample)."""
    from .holdout import images_measured, trial_dir

    out: dict[str, str] = {}
    for r in sorted(front_rows(rows, objectives), key=lambda r: not has_test(r)):
        out = images_measured(trial_dir(study_dir, r["number"], r.get("run_dir"))) | out
        if len(out) == 4:
            break
    return out


def front_rows(rows: list[dict[str, Any]], objectives: str) -> list[dict[str, Any]]:
    """The feasible non-dominated rows at the full budget (a multi-fidelity study's lower rungs never count)."""
    feasible = [r for r in rows if r["state"] == "COMPLETE" and r.get("feasible") and not r.get("partial")]
    return [feasible[i] for i in pareto_front([objective_values(r, objectives) for r in feasible])]


def write_pareto(path: Path, rows: list[dict[str, Any]], param_names: list[str], objectives: str,
                 baseline: float, min_accuracy: float, measured: dict[str, str] | None = None) -> list[dict[str, Any]]:
    front = sorted(front_rows(rows, objectives), key=lambda r: r["number"])
    doc = {
        "objectives": list(OBJECTIVE_NAMES[objectives]),
        "baseline_accuracy": baseline,
        "min_accuracy": min_accuracy,
        # ca, val_accuracy, ra_t, ra_q: validation images (the selection); test: the test sample, after the study
        "images": measured or {},
        "trials": [{"number": r["number"], "params": {p: r[p] for p in param_names},
                    "ca": r["ca"], "val_accuracy": r["val_accuracy"], "ra_t": r["ra_t"], "ra_q": r["ra_q"],
                    "test": ({"ca": r["ca_test"], "ra_t": r["ra_t_test"], "ra_q": r["ra_q_test"]} if has_test(r)
                             else None),
                    # 95% Wilson intervals over each figure's images (validation; test_*: the test sample)
                    "intervals": _intervals(r),
                    "run_dir": r.get("run_dir")} for r in front],
    }
    write_json(path, doc)
    return front


def _short(name: str) -> str:
    return SHORT_NAMES.get(name, name)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e3) and v != 0 else f"{v:.4g}"
    return str(v)


def recommended(front: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Picks from the front: best RA_T, best RA_Q, and the best min(RA_T, RA_Q) (the balanced choice)."""
    if not front:
        return []
    picks = [("best RA_T", max(front, key=lambda r: (r["ra_t"], r["ra_q"]))),
             ("best RA_Q", max(front, key=lambda r: (r["ra_q"], r["ra_t"]))),
             ("balanced: best min(RA_T, RA_Q)", max(front, key=lambda r: (min(r["ra_t"], r["ra_q"]), r["ca"])))]
    return picks


FIGURE_HEAD = ["CA val", "CA test", "RA_T val", "RA_T test", "RA_Q val", "RA_Q test"]


def _intervals(r: dict[str, Any]) -> dict[str, list[float]]:
    """A row's 95% intervals by figure (``ca``, ..., ``test_ra_q``), where its row has them."""
    out = {}
    for key in ("ca", "val_accuracy", "ra_t", "ra_q", *TEST_COLUMNS):
        low, high = r.get(f"{key}_low"), r.get(f"{key}_high")
        if low is not None and high is not None:
            out[key if not key.endswith("_test") else f"test_{key[:-5]}"] = [low, high]
    return out


def _figures(r: dict[str, Any]) -> list[str]:
    """CA, RA_T and RA_Q, each on validation images then on the test sample ("–" where not measured), each
    followed by its 95% interval where the row has it."""
    def f(key: str) -> str:
        v = r.get(key)
        if v is None:
            return "–"
        low, high = r.get(f"{key}_low"), r.get(f"{key}_high")
        return f"{v:.4f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")

    return [f(k) for k in ("ca", "ca_test", "ra_t", "ra_t_test", "ra_q", "ra_q_test")]


def protocol_text(measured: dict[str, str] | None) -> str:
    """How the figures were measured, for recommended.md and report.md."""
    m = measured or {}
    test = (f"RA on {m['ra_test']}; CA on {m['ca_test']}" if "ra_test" in m and "ca_test" in m
            else "the test sample (not evaluated yet)")
    if "ra" not in m or "ca" not in m:  # trials that do not say (a study older than validation scoring chose on test)
        return (f"The trials' results do not say which images they were scored on; studies run before trials were "
                f"scored on validation images selected on the test sample. Test figures: {test}.")
    return (f"Selected on validation images only (objectives and constraint; the baseline on its own validation "
            f"split): RA on {m['ra']}; CA on {m['ca']}. The front was then evaluated once on the test set: {test}.")


def write_recommended(path: Path, front: list[dict[str, Any]], param_names: list[str], title: str,
                      baseline: float, min_accuracy: float, measured: dict[str, str] | None = None) -> str:
    head = ["choice", "trial", *(_short(p) for p in param_names), "epochs", *FIGURE_HEAD]
    lines = [f"# Recommended configurations: {title}", "",
             f"Feasible: validation accuracy >= {min_accuracy:.4f} (centralized baseline {baseline:.4f} minus the "
             f"allowed drop). {len(front)} configuration(s) on the Pareto front.", "",
             protocol_text(measured), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in recommended(front):
        cells = [label, str(r["number"]), *(_value(r[p]) for p in param_names),
                 f"{r['best_epoch']:.0f}" if r.get("best_epoch") is not None else "", *_figures(r)]
        lines.append("| " + " | ".join(cells) + " |")
    if front:
        lines += ["", "Whole front:", "",
                  "| trial | " + " | ".join(_short(p) for p in param_names) + " | " + " | ".join(FIGURE_HEAD) + " |",
                  "|" + "---|" * (len(param_names) + 1 + len(FIGURE_HEAD))]
        for r in sorted(front, key=lambda r: r["ra_t"]):
            lines.append(f"| {r['number']} | " + " | ".join(_value(r[p]) for p in param_names)
                         + " | " + " | ".join(_figures(r)) + " |")
    text = "\n".join(lines) + "\n"
    write_text(path, text)
    return text


def plot_front(study_dir: Path, rows: list[dict[str, Any]], objectives: str, title: str,
               tensorboard: bool = False) -> list[Path]:
    """Scatter of every completed trial with the feasible Pareto front (validation figures) and the front's
    test figures, as PNG and PDF; with
    ``tensorboard``, also as the image ``pareto/front`` of the study's TensorBoard (step: completed trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = OBJECTIVE_NAMES[objectives]
    done = [r for r in rows if r["state"] == "COMPLETE"]
    front = front_rows(rows, objectives)
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    low = [objective_values(r, objectives) for r in done if r.get("partial")]
    done = [r for r in done if not r.get("partial")]
    feas = [objective_values(r, objectives) for r in done if r.get("feasible")]
    infeas = [objective_values(r, objectives) for r in done if not r.get("feasible")]
    if low:  # a multi-fidelity study's lower rungs: less trained, fewer images; never in the front
        ax.scatter(*zip(*low), marker=".", color="0.75", label="below the full budget")
    if infeas:
        ax.scatter(*zip(*infeas), marker="x", color="0.6", label="infeasible (validation accuracy too low)")
    if feas:
        ax.scatter(*zip(*feas), color="tab:blue", alpha=0.6, label="feasible")
    if front:
        pts = sorted(objective_values(r, objectives) for r in front)
        ax.plot(*zip(*pts), "-o", color="tab:red",
                label="Pareto front (validation)")
    tested = [r for r in front if has_test(r)]
    if tested:  # each front trial's test figures, joined to its validation point
        for r in tested:
            ax.plot(*zip(objective_values(r, objectives), objective_values(r, objectives, test=True)), ":",
                    color="tab:red", linewidth=0.8)
        ax.scatter(*zip(*(objective_values(r, objectives, test=True) for r in tested)), marker="D",
                   facecolors="none", edgecolors="tab:red", label="front on the test sample")
    ax.set_xlabel(LABELS[names[0]])
    ax.set_ylabel(LABELS[names[1]])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [study_dir / "pareto.png", study_dir / "pareto.pdf"]
    for p in paths:
        save_figure(fig, p, dpi=150)
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        from ..views import add_figure

        with SummaryWriter(str(study_dir / "tensorboard")) as w:
            add_figure(w, "pareto/front", fig, len(done))
    plt.close(fig)
    return paths
