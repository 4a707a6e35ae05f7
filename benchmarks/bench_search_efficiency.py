"""How much trial compute each tuning method needs to reach NSGA-II's final front.

For each data set, method and seed, a study runs (resumable: rerun the same
command and finished studies are read back, an interrupted one resumes), then
its trace is read from its own files: each trial evaluation's CPU-seconds
(start to end in ``executions.jsonl``, times ``tune.cpus_per_trial``; failed
and diverged trials count too, in the order they ended), and after each one
the hypervolume of the feasible front of the full-budget rows so far
(validation objectives RA_T and RA_Q, reference point (0, 0), the same for
every method). A multi-fidelity study's lower rungs cost compute but never
enter the front.

Methods: ``nsga2`` (the paper's, population 8), ``tpe``, ``gp`` (Optuna's
multi-objective TPE and Gaussian-process samplers, 8 start-up trials), and
``moasha`` (tune.scheduler=moasha over NSGA-II: 3 rungs, eta 3). The
full-budget methods run ``--trials`` trials; MO-ASHA runs twice as many
configurations, most of them stopped at a ninth of the budget.

What is cut to fit about two hours on 2 cores: 9 epochs per trial (rungs 1,
3, 9), 180 validation images attacked (rungs 20, 60, 180), one surrogate
(cnn), 200 Square queries, no white-box attacks; Fashion-MNIST on a
stratified 6,000-image training subset; 24 trials; seeds 0-2 of the sampler
(the data and training seeds stay fixed). The baseline accuracy is trained
once per data set; the surrogate zoo and transfer examples are prepared once
and are not in the trials' compute (MO-ASHA's two smaller image sets add
their transfer examples there too).

Output: ``OUT/summary.json``, ``OUT/summary.md`` (the table), and the plot
``docs/search_efficiency.png`` (median and range over seeds of the
hypervolume against cumulative trial CPU-seconds).

Usage: python benchmarks/bench_search_efficiency.py [--out benchmarks/out/search_efficiency]
       [--data digits fashion_mnist] [--methods nsga2 tpe gp moasha] [--seeds 0 1 2] [--trials 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = {
    "nsga2": ["tune.sampler=nsga2"],
    "tpe": ["tune.sampler=tpe"],
    "gp": ["tune.sampler=gp"],
    "moasha": ["tune.sampler=nsga2", "tune.scheduler=moasha", "tune.fidelity.rungs=3",
               "tune.fidelity.reduction_factor=3", "tune.fidelity.min_images=20"],
}
DATA = {
    "digits": ["data=digits"],
    # the zoo's 5 epochs: the protocol the published figures were measured with (attack=fashion_mnist trains 1 since)
    "fashion_mnist": ["data=fashion_mnist", "data.train_subset=6000", "attack.eps=0.1", "attack.surrogate_epochs=5"],
}
COMMON = ["engine=inline", "train.epochs=9", "train.progress=false", "attack.num_samples=180",
          "attack.surrogates=[cnn]", "attack.whitebox=[]", "attack.tsr=false", "attack.hessian_samples=0",
          "attack.per_member=false", "attack.queries=200", "tune.population_size=8", "tune.max_concurrent=2",
          "tune.cpus_per_trial=1"]


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float] = (0.0, 0.0)) -> float:
    """The area dominated by ``points`` (both objectives maximised) above ``ref``."""
    pts = sorted({p for p in points if p[0] > ref[0] and p[1] > ref[1]}, key=lambda p: (-p[0], -p[1]))
    area, best_y = 0.0, ref[1]
    for x, y in pts:  # x falls; each point adds the strip above the best y so far
        if y > best_y:
            area += (x - ref[0]) * (y - best_y)
            best_y = y
    return area


def trace(study_dir: Path, cpus: float = 1.0) -> list[tuple[float, float]]:
    """(cumulative trial CPU-seconds, hypervolume of the feasible full-budget front) after each evaluation."""
    from fedrobust.tuning.outputs import read_trials_csv

    rows = read_trials_csv(study_dir / "trials.csv")
    by_key = {}
    for r in rows:
        rung = r.get("rung") or 0
        by_key[str(r["number"]) if rung == 0 else f"{r['number']}.r{rung}"] = r
    events = [json.loads(line) for line in (study_dir / "executions.jsonl").read_text().splitlines()]
    started: dict[str, float] = {}
    spent, front, out = 0.0, [], []
    for e in events:
        key = str(e["key"])
        if e["event"] == "start":
            started[key] = e["time"]
        elif e["event"] in ("end", "fail", "lost", "cancelled") and key in started:
            spent += (e["time"] - started.pop(key)) * cpus
            r = by_key.get(key)
            if e["event"] == "end" and r and r["state"] == "COMPLETE" and r.get("feasible") and not r.get("partial"):
                front.append((r["ra_t"], r["ra_q"]))
            out.append((spent, hypervolume(front)))
    return out


def compute_to_reach(tr: list[tuple[float, float]], target: float) -> float | None:
    """The trial CPU-seconds after which the trace's hypervolume first reaches ``target`` (None: never)."""
    return next((c for c, hv in tr if hv >= target - 1e-12), None)


def run_one(data: str, method: str, seed: int, trials: int, out: Path, baseline: float) -> Path:
    from fedrobust.config import load_config
    from fedrobust.tuning.study import run_study

    d = out / data / method / f"seed{seed}"
    done = d / "done.json"
    if done.is_file():
        return d
    n = 2 * trials if method == "moasha" else trials
    cfg = load_config([*COMMON, *DATA[data], *METHODS[method], f"tune.n_trials={n}", f"tune.seed={seed}",
                       f"tune.baseline_accuracy={baseline}", f"study_dir={d}"])
    print(f"[{time.strftime('%H:%M:%S')}] {data} {method} seed {seed}: {n} trials", flush=True)
    t0 = time.perf_counter()
    run_study(cfg)
    done.write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1)}))
    return d


def baseline_of(data: str, out: Path) -> float:
    """The centralized baseline's validation accuracy, trained once per data set."""
    path = out / data / "baseline.json"
    if path.is_file():
        return json.loads(path.read_text())["accuracy"]
    from fedrobust.config import load_config
    from fedrobust.tuning.study import _base_cfg_for_trials, baseline_accuracy, prepare_zoo

    cfg = load_config([*COMMON, *DATA[data], f"study_dir={out / data}"])
    base = _base_cfg_for_trials(cfg)
    acc = baseline_accuracy(base, out / data)
    for method in METHODS:  # the zoo and every image set's transfer examples, outside the trials' compute
        prepare_zoo(_base_cfg_for_trials(load_config([*COMMON, *DATA[data], *METHODS[method],
                                                      f"study_dir={out / data}"])))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"accuracy": acc}))
    return acc


def summarise(out: Path, datas: list[str], methods: list[str], seeds: list[int]) -> dict:
    summary: dict = {}
    for data in datas:
        traces = {m: {s: trace(out / data / m / f"seed{s}") for s in seeds
                      if (out / data / m / f"seed{s}" / "done.json").is_file()} for m in methods}
        ref = traces.get("nsga2", {})
        if not ref:
            continue
        target = statistics.median(tr[-1][1] for tr in ref.values())  # NSGA-II's final hypervolume (median)
        nsga_cost = statistics.median(tr[-1][0] for tr in ref.values())
        rows = {}
        for m, by_seed in traces.items():
            if not by_seed:
                continue
            reach = [compute_to_reach(tr, target) for tr in by_seed.values()]
            fractions = [None if c is None else c / nsga_cost for c in reach]
            reached = [f for f in fractions if f is not None]
            rows[m] = {
                "seeds": len(by_seed),
                "final_hv": [round(tr[-1][1], 4) for tr in by_seed.values()],
                "cpu_s": [round(tr[-1][0], 1) for tr in by_seed.values()],
                "fraction_to_reach": [None if f is None else round(f, 3) for f in fractions],
                # the median over seeds, a seed that never reached it counting as infinitely costly
                "median_fraction": (statistics.median([f if f is not None else float("inf") for f in fractions])
                                    if fractions else None),
                "reached": f"{len(reached)}/{len(fractions)}",
            }
        summary[data] = {"target_hv": round(target, 4), "nsga2_cpu_s": round(nsga_cost, 1), "methods": rows,
                         "traces": {m: {str(s): tr for s, tr in by_seed.items()} for m, by_seed in traces.items()}}
    return summary


def table(summary: dict) -> str:
    lines = ["| data | method | final HV (seeds) | trial CPU-s (seeds) | compute to reach NSGA-II's final HV, "
             "fraction of NSGA-II's (median; seeds) |", "|---|---|---|---|---|"]
    for data, s in summary.items():
        for m, r in s["methods"].items():
            med = r["median_fraction"]
            med_text = "not reached" if med is None or med == float("inf") else f"{med:.2f}"
            per_seed = ", ".join("—" if f is None else f"{f:.2f}" for f in r["fraction_to_reach"])
            lines.append(f"| {data} | {m} | {', '.join(f'{v:.3f}' for v in r['final_hv'])} | "
                         f"{', '.join(f'{v:.0f}' for v in r['cpu_s'])} | {med_text} ({per_seed}) |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 4.0), squeeze=False)
    for ax, (data, s) in zip(axes[0], summary.items()):
        for m, by_seed in s["traces"].items():
            if not by_seed:
                continue
            end = max(tr[-1][0] for tr in by_seed.values())
            grid = np.linspace(0, end, 200)
            curves = np.array([[max([hv for c, hv in tr if c <= g], default=0.0) for g in grid]
                               for tr in by_seed.values()])
            ax.plot(grid, np.median(curves, axis=0), label=m)
            ax.fill_between(grid, curves.min(axis=0), curves.max(axis=0), alpha=0.15)
        ax.axhline(s["target_hv"], color="0.4", linestyle=":", linewidth=0.8, label="NSGA-II's final (median)")
        ax.set_title(data)
        ax.set_xlabel("cumulative trial CPU-seconds")
        ax.set_ylabel("hypervolume (validation RA_T x RA_Q)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "search_efficiency")
    p.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "search_efficiency.png")
    p.add_argument("--summarise-only", action="store_true", help="read the finished studies, run none")
    args = p.parse_args()
    from fedrobust.run import setup_logging

    setup_logging()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarise_only:
        for seed in args.seeds:  # seed by seed, so an interrupted run has whole seeds of every method
            for data in args.data:
                baseline = baseline_of(data, args.out)
                for method in args.methods:
                    run_one(data, method, seed, args.trials, args.out, baseline)
    summary = summarise(args.out, args.data, args.methods, args.seeds)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    text = table(summary)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    if summary:
        plot(summary, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
