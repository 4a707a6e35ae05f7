"""Curvature and EDLCM training of ResNet-18 on CIFAR-shaped data at the defaults: is every loss finite?

Trains one ResNet-18 member per (strategy, learning rate) with the strategy's
defaults (alpha 1, beta 0.01, the default h, the default ``clip_grad_norm``) and
the trainer's (SGD momentum 0.9, weight decay 5e-4, batch 128, cosine
schedule), and prints each epoch's training loss, cross-entropy, penalty
terms and validation loss. EDLCM is the federated form: one member with one
frozen peer (another initialisation), so the dispersion term is live.

The data are synthetic CIFAR-shaped images with learnable structure: ten
random class prototypes, each image half its class's prototype and half
uniform noise. ``--clip-grad-norm none`` runs without the stabiliser (the
former behaviour), which reaches a non-finite loss within a few steps.

Usage: python benchmarks/resnet18_stability.py [--n 128] [--epochs 10] [--lrs 0.1 0.4]
       [--strategies curvature edlcm] [--clip-grad-norm 1.0|none] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from fedrobust.models import build_model
from fedrobust.training import MemberTrainer, TrainSettings
from strategies import EDLCM, Curvature
from strategies.regulariser import CLIP_GRAD_NORM


def cifar_shaped(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 3x32x32 images in [0, 1] of 10 classes: half a class prototype, half uniform noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(10, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return 0.5 * prototypes[y] + 0.5 * torch.rand(n, 3, 32, 32, generator=g), y


def resnet18(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", 3, 10, (0.5,) * 3, (0.25,) * 3)


def train(strategy_name: str, lr: float, n: int, epochs: int, clip: float | None, batch_size: int = 128,
          patience: int | None = None, verbose: bool = True) -> list:
    """The epoch records of one run (it stops early if the trainer stops a diverged member)."""
    x, y = cifar_shaped(n + n // 4)
    strategy = Curvature(clip_grad_norm=clip) if strategy_name == "curvature" else EDLCM(clip_grad_norm=clip)
    peers = [resnet18(1).eval()] if strategy_name == "edlcm" else []
    settings = TrainSettings(lr=lr, epochs=epochs, batch_size=batch_size, patience=patience or epochs + 1)
    trainer = MemberTrainer(resnet18(0), x[:n], y[:n], x[n:], y[n:], strategy, settings, seed=0)
    records = []
    for _ in range(epochs):
        t = time.perf_counter()
        try:
            out = trainer.run(1, peers=peers, progress=False)
        except Exception as e:  # a trainer that refuses a diverged member
            print(f"  {strategy_name} lr {lr}: stopped: {e}", flush=True)
            records.append(None)
            break
        if not out:
            break
        rec = out[0]
        records.append(rec)
        if verbose:
            terms = " ".join(f"{k} {v:.4g}" for k, v in sorted(rec.terms.items()))
            print(f"  {strategy_name} lr {lr} epoch {rec.epoch}: loss {rec.train_loss:.4g} ({terms}) "
                  f"val_loss {rec.val_loss:.4g} val_acc {rec.val_acc:.3f} [{time.perf_counter() - t:.0f} s]", flush=True)
    return records


def finite(records) -> bool:
    return bool(records) and None not in records and all(
        math.isfinite(r.train_loss) and math.isfinite(r.val_loss) and all(math.isfinite(v) for v in r.terms.values())
        for r in records
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=128, help="training images (plus n/4 for validation)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.4])
    p.add_argument("--strategies", nargs="+", default=["curvature", "edlcm"], choices=["curvature", "edlcm"])
    p.add_argument("--clip-grad-norm", default=str(CLIP_GRAD_NORM), help="a bound, or 'none'")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    clip = None if args.clip_grad_norm.lower() == "none" else float(args.clip_grad_norm)
    summary = []
    for name in args.strategies:
        for lr in args.lrs:
            records = train(name, lr, args.n, args.epochs, clip)
            summary.append(f"{name} lr {lr}: {len(records)} epochs, every loss finite: {finite(records)}")
    print(f"ResNet-18, {args.n} training images, clip_grad_norm {clip}:")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
