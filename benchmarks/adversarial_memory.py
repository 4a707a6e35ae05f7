"""Peak RSS of one epoch of adversarial training on ResNet-18 with a large CIFAR-shaped validation split.

The strategy's ``begin_epoch`` attacks the validation split to set the epoch's
clean/adversarial weight. ``--form batched`` is the current code, through the
trainer (the attack runs on ``train.batch_size`` images at a time, uint8 images
converted a batch at a time); ``--form whole`` reproduces the former
behaviour: the split converted to float at once and attacked as one batch.
Each run is one fresh process; the figure is ``ru_maxrss`` at its end.

The whole-split form needs memory in proportion to the split (every image's
activations are held for the attack's backward pass), so on a small machine
run it on a few sizes and extrapolate; ``--limit-gb`` caps the process's
address space so that an oversized run fails with an allocation error
instead of taking the machine's memory.

Usage: python benchmarks/adversarial_memory.py --form batched --val 10000 [--attack fgsm] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from fedrobust.data import to_float
from fedrobust.models import build_model
from fedrobust.training import MemberTrainer, TrainSettings
from strategies import Adversarial


class WholeSplit(Adversarial):
    """The former validation attack: the whole split, converted at once, in one batch."""

    def begin_epoch(self, model, epoch, total_epochs, x_val, y_val, seed, *, batch_size=None):
        return super().begin_epoch(model, epoch, total_epochs, to_float(x_val), y_val, seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--form", choices=("batched", "whole"), required=True)
    p.add_argument("--val", type=int, default=10000, help="validation images (uint8, 3x32x32)")
    p.add_argument("--train", type=int, default=128, help="training images")
    p.add_argument("--attack", choices=("pgd", "fgsm"), default="pgd")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit-gb", type=float, default=None, help="cap the address space (RLIMIT_AS)")
    args = p.parse_args()
    if args.limit_gb:
        cap = int(args.limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.train + args.val
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 10, (0.5,) * 3, (0.25,) * 3)
    cls = WholeSplit if args.form == "whole" else Adversarial
    strategy = cls(attack=args.attack, steps=args.steps)
    settings = TrainSettings(lr=0.1, epochs=1, batch_size=args.batch_size)
    trainer = MemberTrainer(model, x[: args.train], y[: args.train], x[args.train :], y[args.train :], strategy, settings, seed=0)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = time.perf_counter()
    try:
        (record,) = trainer.run(1, progress=False)
        outcome = f"val_adv_acc {record.terms['val_adv_acc']:.4f}"
    except (RuntimeError, MemoryError) as e:  # the address-space cap
        outcome = f"failed: {str(e).splitlines()[0][:120]}"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"form={args.form} val={args.val} attack={args.attack} batch={args.batch_size}: peak RSS {peak:.2f} GiB "
          f"(before the epoch {base:.2f} GiB), {time.perf_counter() - t:.0f} s, {outcome}")


if __name__ == "__main__":
    main()
