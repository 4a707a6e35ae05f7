"""The attack figures of a small evaluation on digits, and the run that produces them.

``python tests/golden_evaluation.py OUT.json [WORK_DIR]`` trains and evaluates
that run (in WORK_DIR/run, with its cache in WORK_DIR/cache; a temporary
folder if none is given) and writes its figures; ``tests/data/evaluation_golden.json``
holds them as recorded, and ``tests/test_evaluation_stages.py`` checks that
today's evaluation gives them again, within tolerances it states (a robust
accuracy within one image): CPUs that order float sums differently move the
last bits, and the smoothness figures with them. The surrogates (a CNN and an
MLP) train to 0.95+ accuracy in their 2 epochs: a diverged surrogate (a VGG-16
did, here) turns those last bits into different figures. Both run it as a
fresh process: the figures depend on process-wide state that earlier tests
change (torch's thread count, for one).

Regenerate the golden file only for a change that is meant to move the
figures, and say why in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TRAIN = ["engine=inline", "train.epochs=2", "train.progress=false"]
ATTACK = [
    "attack.num_samples=40", "attack.queries=15", "attack.surrogates=[cnn,mlp]", "attack.surrogate_epochs=2",
    "attack.apgd_steps=4", "attack.whitebox_steps=3", "attack.transfer_steps=2", "attack.tsr_steps=2",
    "attack.hessian_samples=4", "attack.power_iters=3", "attack.batch_size=16",
]


def figures(results: dict) -> dict:
    """What an evaluation measured (no timings, paths or cache flags)."""
    ens = results["ensemble"]
    attacks = {name: {k: v for k, v in e.items() if k != "cached"} for name, e in ens["attacks"].items()}
    return {
        "clean_accuracy_sample": ens["clean_accuracy_sample"],
        "robust_accuracy": ens["robust_accuracy"],
        "intervals": ens["intervals"],
        "unions": ens["unions"],
        "attacks": attacks,
        "tsr": ens["tsr"],
        "smoothness": ens["smoothness"],
        "members": [m["robust_accuracy"] for m in results["members"]],
        "member_unions": [m["unions"] for m in results["members"]],
        "surrogate_clean_accuracy": results["evaluation"]["surrogate_clean_accuracy"],
    }


def run(run_dir: Path, cache_dir: Path) -> dict:
    from fedrobust.cli import main

    # trained and evaluated in one command (`fedrobust train evaluate=true`, as the demo runs): the golden
    # figures were recorded by `fedrobust train` then `fedrobust evaluate`, and both give them bit for bit
    assert main(["train", *TRAIN, "evaluate=true", *ATTACK, f"attack.cache_dir={cache_dir}", f"run_dir={run_dir}"]) == 0
    return figures(json.loads((run_dir / "results.json").read_text()))


if __name__ == "__main__":
    import tempfile

    if len(sys.argv) > 2:
        out = run(Path(sys.argv[2]) / "run", Path(sys.argv[2]) / "cache")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = run(Path(tmp) / "run", Path(tmp) / "cache")
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
