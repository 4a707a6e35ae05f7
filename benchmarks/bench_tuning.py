"""Wall time of a fixed 8-trial study run 2 trials at a time against 1 at a time, in one go.

Both studies get the same 8 configurations (drawn once from the default
search space with a seeded random sampler and queued in each study), 1 CPU
per trial, digits, inline training, and share the surrogate zoo trained
beforehand. Each study starts its own local Ray instance, inside the timing.
Goal: 2 at a time <= 0.55x the wall time of 1 at a time (issue 41). Besides the
whole study, it prints the trials' own makespan (first start to last end, from
``executions.jsonl``) and the rest: the Ray start before the trials and the
front's test evaluation after them, which both studies pay in full.

Usage: python benchmarks/bench_tuning.py [--epochs 10] [--trials 8] [--out /tmp/bench_tuning]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import optuna

from fedrobust.config import load_config
from fedrobust.run import setup_logging
from fedrobust.tuning.space import SearchSpace
from fedrobust.tuning.study import open_study, prepare_zoo, run_study


def draw_fixed(space: SearchSpace, n: int) -> list[dict]:
    """``n`` configurations drawn once from ``space`` with a seeded random sampler."""
    draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize", "maximize"])
    fixed = []
    for _ in range(n):
        t = draw.ask()
        fixed.append(space.suggest(t))
        draw.tell(t, [0.0, 0.0])
    return fixed


def timed_study(run_cfg, study_dir: Path, fixed: list[dict]) -> float:
    """Seconds to run a new study in ``study_dir`` whose trials are ``fixed`` (queued in order)."""
    shutil.rmtree(study_dir, ignore_errors=True)
    study_dir.mkdir(parents=True)
    study = open_study(run_cfg, study_dir)
    for params in fixed:
        study.enqueue_trial(params)
    t0 = time.perf_counter()
    run_study(run_cfg)
    return time.perf_counter() - t0


def makespan(study_dir: Path) -> float:
    """First trial start to last trial end, from the study's execution log."""
    import json

    events = [json.loads(line) for line in (study_dir / "executions.jsonl").read_text().splitlines()]
    starts = [e["time"] for e in events if e["event"] == "start"]
    ends = [e["time"] for e in events if e["event"] == "end"]
    return max(ends) - min(starts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--out", default=None, help="where the two studies go (default: a temporary folder)")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_tuning_"))
    base = ["engine=inline", f"train.epochs={args.epochs}", "train.progress=false", "tune.baseline_accuracy=0.5",
            f"tune.n_trials={args.trials}", "tune.population_size=4", "tune.cpus_per_trial=1",
            "attack.surrogates=[cnn]", "attack.whitebox=[]", "attack.tsr=false", "attack.hessian_samples=0",
            "attack.per_member=false", "attack.queries=200"]
    setup_logging()
    cfg = load_config(base)
    prepare_zoo(cfg)  # the zoo is shared; train it outside the timing
    fixed = draw_fixed(SearchSpace.from_config(cfg), args.trials)
    times, spans = {}, {}
    for k in (1, 2):
        d = out / f"concurrent{k}"
        times[k] = timed_study(load_config([*base, f"study_dir={d}", f"tune.max_concurrent={k}"]), d, fixed)
        spans[k] = makespan(d)
    print(f"{args.trials} fixed trials (digits, {args.epochs} epochs, 1 CPU each), studies in {out}")
    for k in (1, 2):
        print(f"{k} at a time: {times[k]:7.1f} s (trials {spans[k]:6.1f} s, the rest {times[k] - spans[k]:5.1f} s)")
    print(f"ratio 2/1: {times[2] / times[1]:.2f}x the study (goal <= 0.55x), {spans[2] / spans[1]:.2f}x its trials")


if __name__ == "__main__":
    main()
