"""Per-epoch training time of the regularisers as a ratio to plain, ``fd`` and ``exact`` gradients, in one run.

For each setting (the digits CNN on node 0's shard of the default deployment;
ResNet-18 on random 3x32x32 images) every strategy gets its own trainer, all
from the same initial members, and the timed blocks are interleaved: one
block of each strategy in turn, repeated ``--reps`` times, so drift in the
machine's speed hits every strategy alike. A block is one round of
``--round`` epochs (5 on the CNN, 2 on ResNet-18; validation included, as in
training; learning rate 0, so that every block computes on the same
weights); the figure is the median block, per epoch.

* curvature: one member.
* edlcm, federated: one member with ``--members - 1`` frozen peers whose
  gradient differences are recomputed at the start of every round.
* edlcm, joint: ``--members`` members on one node trained together (deep
  ensemble), against as many plain members trained one after the other.

Each in both forms of the penalty's weight gradient (``strategy.grad``): ``fd``,
four first-order passes, and ``exact``, double backpropagation. Goal: ``fd`` at
most 4x plain and below ``exact``. For scale: EDLCM's paper reports 596 s
against 23 s per epoch (26x, 3 ResNet-18, A100), TRS 6.5x and CURE 7.7x.

``--profile NAME`` prints a torch.profiler table of one block of that
strategy instead (e.g. ``--profile "edlcm joint fd"``).

Usage: python benchmarks/bench_strategies.py [--settings cnn resnet18] [--reps 3] [--round EPOCHS] [--n 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedrobust.config import load_config
from fedrobust.data import load_dataset, to_float
from fedrobust.models import build_model
from fedrobust.node import shards_for
from fedrobust.training import MemberTrainer, TrainSettings
from strategies import EDLCM, Curvature, Plain


def setting(name: str, n_random: int):
    """(model name, x, y, x_val, y_val, channels, mean, std, batch size) of a benchmark setting."""
    if name == "cnn":
        data = load_dataset("digits")
        shard = shards_for(load_config([]), data)[0]
        x, y = data.x_train[shard.train], data.y_train[shard.train]
        xv, yv = data.x_train[shard.val], data.y_train[shard.val]
        return "cnn", x, y, xv, yv, 1, data.mean, data.std, 128
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n_random, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n_random,), generator=g)
    return name, x, y, x[: n_random // 4], y[: n_random // 4], 3, (0.5,) * 3, (0.25,) * 3, 64


def step_breakdown(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, reps: int) -> dict[str, float]:
    """Median seconds of a plain step and of each part of one curvature ``fd`` step, on one batch."""
    from strategies.curvature import curvature_penalty
    from strategies.hessian import default_h
    from strategies.regulariser import _fd_gradient, _linear_in_weights, _probe

    model.train()
    params = list(model.parameters())
    parts: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        parts.setdefault(name, []).append(time.perf_counter() - t)
        return out

    for i in range(reps + 2):
        timed("plain step (forward + backward)", lambda: Plain().loss(model, x, y).total.backward(inputs=params))
        pr = timed("passes at x and x1 (input and weight gradients)", lambda: _probe(model, x, y, default_h(x)))

        def direction():
            leaf = pr.diff.detach().requires_grad_(True)
            with torch.enable_grad():
                return torch.autograd.grad(curvature_penalty(leaf), leaf)[0]

        u = timed("u = dpenalty/dD (autograd on the detached D)", direction)
        grads = timed("passes at x+eps u and x1+eps u, combination", lambda: _fd_gradient(model, pr, x, y, u, None))
        timed("backward of the loss (injects the gradient)",
              lambda: (pr.ce + _linear_in_weights(pr.params, grads)).backward(inputs=params))
        if i < 2:  # warm-up
            parts = {}
    return {k: statistics.median(v) for k, v in parts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["cnn", "resnet18"])
    p.add_argument("--reps", type=int, default=3, help="interleaved blocks per strategy")
    p.add_argument("--round", type=int, default=None, help="epochs per block (a federated round); default 5 on cnn, 2 on resnet18")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=64, help="random training images for resnet18")
    p.add_argument("--profile", default=None, help="profile one block of this strategy instead")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = args.members

    for name in args.settings:
        model_name, x, y, xv, yv, c, mean, std, batch = setting(name, args.n)
        # lr 0: the weights stay where they start, so timings do not depend on where training goes (ResNet-18 on
        # random labels with the curvature penalty diverges to NaN within a few epochs at lr 0.1)
        settings = TrainSettings(lr=0.0, epochs=10**6, batch_size=batch, patience=10**6)
        epochs = args.round or (5 if name == "cnn" else 2)

        def member(seed: int):
            torch.manual_seed(seed)
            return build_model(model_name, c, 10, mean, std)

        peers = [member(i).eval() for i in range(1, n)]
        cases = {  # label: (strategy, models, peers, plain members it compares with)
            "plain": (Plain(), member(0), (), 1),
        }
        for grad in ("fd", "exact"):
            cases[f"curvature {grad}"] = (Curvature(grad=grad), member(0), (), 1)
            cases[f"edlcm federated {grad}"] = (EDLCM(grad=grad), member(0), peers, 1)
            cases[f"edlcm joint {grad}"] = (EDLCM(grad=grad), [member(i) for i in range(n)], (), n)
        trainers = {}
        for label, (strategy, models, ps, _) in cases.items():
            trainers[label] = MemberTrainer(models, x, y, xv, yv, strategy, settings, seed=0)
            trainers[label].run(1, peers=ps, progress=False)  # warm-up

        def block(label: str) -> float:
            _, _, ps, _ = cases[label]
            t = time.perf_counter()
            trainers[label].run(epochs, peers=ps, progress=False)
            return (time.perf_counter() - t) / epochs

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                block(args.profile)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
            continue

        times: dict[str, list[float]] = {label: [] for label in cases}
        for _ in range(args.reps):
            for label in cases:
                times[label].append(block(label))
        med = {label: statistics.median(v) for label, v in times.items()}
        print(f"{model_name}: {len(x)} images {tuple(x.shape[1:])}, batch {batch}, {args.threads} threads, "
              f"{args.reps} interleaved blocks of {epochs} epochs, median s/epoch")
        print(f"  {'strategy':32s} {'s/epoch':>8s} {'x plain':>8s}")
        print(f"  {'plain':32s} {med['plain']:8.3f} {1:8.2f}")
        for kind in ("curvature", "edlcm federated", "edlcm joint"):
            for grad in ("fd", "exact"):
                label = f"{kind} {grad}"
                members = cases[label][3]  # joint: against as many plain members trained one after the other
                ratio = med[label] / (members * med["plain"])
                shown = label + (f", {n - 1} peers" if "federated" in kind else f", {n} members" if "joint" in kind else "")
                print(f"  {shown:32s} {med[label]:8.3f} {ratio:8.2f}")
            fd, exact = med[f"{kind} fd"], med[f"{kind} exact"]
            print(f"  {'':32s} fd / exact {fd / exact:.2f}")
        bd = step_breakdown(member(0), to_float(x[:batch]), y[:batch],
                            reps=30 if name == "cnn" else 5)
        plain_step = bd.pop("plain step (forward + backward)")
        print(f"  one curvature fd step on one batch of {batch}, by part, in plain steps ({plain_step * 1e3:.1f} ms):")
        for part, t in bd.items():
            print(f"    {part:50s} {t / plain_step:5.2f}")
        print(f"    {'total':50s} {sum(bd.values()) / plain_step:5.2f}")


if __name__ == "__main__":
    main()
