"""Per-epoch training time of each strategy as a ratio to plain, measured in one run.

Same data (node 0's training shard of the default digits deployment, or random
CIFAR-sized images with --image 32), same initial member, same batches.

* federated form: one member with N-1 frozen peers (default N=3). Without
  augmentation the peers' directions are computed once per round; we report
  rounds of 1 epoch (peers recomputed every epoch: the worst case) and of 5.
* joint form: N members on one node trained together (deep ensemble),
  against N plain members trained one after the other.
* scaling of the federated dispersion epoch with the number of peers.

EDLCM's paper reports 596 s against 23 s per epoch (26x, 3 ResNet-18, A100).
Goal here: <= 4x for edlcm with 3 members. Also shown: the opt-in lazy form
(``strategy.every=2``: the regulariser on one batch in two, scaled by two).

Usage: python benchmarks/bench_strategies.py [--model cnn] [--image 8|32] [--epochs 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedrobust.config import load_config
from fedrobust.data import load_dataset
from fedrobust.models import build_model
from fedrobust.node import shards_for
from fedrobust.training import MemberTrainer, TrainSettings
from strategies import EDLCM, Curvature, Dispersion, Plain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--image", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=512, help="training images for --image 32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.image == 8:
        data = load_dataset("digits")
        shard = shards_for(load_config([]), data)[0]
        x, y = data.x_train[shard.train], data.y_train[shard.train]
        xv, yv = data.x_train[shard.val], data.y_train[shard.val]
        c, mean, std = 1, data.mean, data.std
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(args.n, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (args.n,), generator=g)
        xv, yv = x[: args.n // 4], y[: args.n // 4]
        c, mean, std = 3, (0.5,) * 3, (0.25,) * 3
    settings = TrainSettings(epochs=1000, batch_size=128)

    def member(seed: int):
        torch.manual_seed(seed)
        return build_model(args.model, c, 10, mean, std)

    def epoch_time(strategy, models, peers=(), epochs_per_round=1) -> float:
        trainer = MemberTrainer(models, x, y, xv, yv, strategy, settings, seed=0)
        trainer.run(1, peers=peers, progress=False)  # warm-up
        t = time.perf_counter()
        done = 0
        while done < args.epochs * epochs_per_round:
            trainer.run(epochs_per_round, peers=peers, progress=False)
            done += epochs_per_round
        return (time.perf_counter() - t) / done

    n = args.members
    peers = [member(i).eval() for i in range(1, n)]
    base = epoch_time(Plain(), member(0))
    print(f"data: {len(x)} images {tuple(x.shape[1:])}, model {args.model}, batch 128, {args.threads} threads")
    print(f"plain                          {base:7.3f} s/epoch   1.00x")
    for name, strat, ps in [
        ("curvature", Curvature(), ()),
        (f"dispersion  federated, {n - 1} peers", Dispersion(), peers),
        (f"edlcm       federated, {n - 1} peers", EDLCM(), peers),
    ]:
        t1 = epoch_time(strat, member(0), ps, 1)
        line = f"{name:30s} {t1:7.3f} s/epoch  {t1 / base:5.2f}x"
        if ps:
            t5 = epoch_time(strat, member(0), ps, 5)
            line += f"   (5 epochs per round: {t5:.3f} s, {t5 / base:.2f}x)"
        print(line)
    lazy = epoch_time(EDLCM(every=2), member(0), peers, 5)
    print(f"{'edlcm every=2 (lazy, opt-in)':30s} {lazy:7.3f} s/epoch  {lazy / base:5.2f}x   (federated, 5 epochs per round)")
    plain_all = base * n
    joint = epoch_time(EDLCM(), [member(i) for i in range(n)])
    print(f"edlcm joint, {n} members on one node {joint:7.3f} s/epoch vs {n} plain members {plain_all:.3f} s: {joint / plain_all:.2f}x")
    print("federated dispersion scaling with peers (1 epoch per round):")
    for k in (1, 2, 4, 6):
        ps = [member(10 + i).eval() for i in range(k)]
        t = epoch_time(Dispersion(), member(0), ps, 1)
        print(f"  {k} peer(s): {t:.3f} s/epoch  {t / base:.2f}x plain")


if __name__ == "__main__":
    main()
