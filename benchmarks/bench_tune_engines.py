"""Wall time of the same 4-trial study with trials trained inline against Flower's simulation engine.

Both studies get the same 4 configurations (drawn once from the default
search space with a seeded random sampler and queued in each study), the
demo's defaults otherwise (digits, 40 epochs with early stopping, the full
evaluation), 2 trials at a time on 1 CPU each, and share the surrogate zoo
trained beforehand. Each study starts its own local Ray instance, inside the
timing. The engines train the same members bit for bit, so the scores must
agree; the script says whether they do.

Usage: python benchmarks/bench_tune_engines.py [--trials 4] [--out /tmp/bench_tune_engines] [overrides...]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench_tuning import draw_fixed, timed_study  # this folder is on the path when the script runs

from fedrobust.run import setup_logging
from fedrobust.tuning.outputs import read_trials_csv
from fedrobust.tuning.space import SearchSpace
from fedrobust.tuning.study import prepare_zoo
from fedrobust.validation import load_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--out", default=None, help="where the two studies go (default: a temporary folder)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both studies")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_tune_engines_"))
    base = ["train.progress=false", "tune.baseline_accuracy=0.5", f"tune.n_trials={args.trials}",
            "tune.population_size=4", "tune.max_concurrent=2", "tune.cpus_per_trial=1", *args.overrides]
    setup_logging()
    cfg = load_config(base)
    prepare_zoo(cfg)  # the zoo is shared; train it outside the timing
    fixed = draw_fixed(SearchSpace.from_config(cfg), args.trials)
    times, scores = {}, {}
    for engine in ("inline", "simulation"):
        d = out / engine
        times[engine] = timed_study(load_config([f"engine={engine}", *base, f"study_dir={d}"]), d, fixed)
        rows = read_trials_csv(d / "trials.csv")
        scores[engine] = sorted((r["ca"], r["ra_t"], r["ra_q"]) for r in rows if r["state"] == "COMPLETE")
    print(f"{args.trials} fixed trials (digits, the demo's defaults, 2 at a time, 1 CPU each), studies in {out}")
    for engine in times:
        print(f"engine={engine:10s} {times[engine]:7.1f} s   {times[engine] / args.trials:6.1f} s per trial")
    print(f"inline / simulation: {times['inline'] / times['simulation']:.2f}x; "
          f"{(times['simulation'] - times['inline']) / args.trials:.1f} s saved per trial")
    same = scores["inline"] == scores["simulation"]
    print(f"same CA, RA_T, RA_Q per trial: {same}" + ("" if same else f"  {scores}"))


if __name__ == "__main__":
    main()
