"""The fast path against a bare PyTorch loop, on CUDA when present and on CPU otherwise.

Synthetic CIFAR-shaped data (uint8, 3x32x32, 10 classes, on the device), so
nothing is downloaded. Each figure is measured in this one run, after a
warm-up, with the device synchronised around every timing:

1. One epoch of ResNet-18 through ``train_member`` (plain strategy, fp32,
   no augmentation; its per-epoch validation and best-checkpoint copy are
   included) against a bare loop on the same tensors, batch size and
   optimiser: randperm, gather, forward, cross-entropy, backward, SGD step.
   Goal: >= 0.9x the bare loop's throughput.
2. The ensemble forward of 3, 5 and 7 ResNet-18s: vectorised
   (``torch.func.vmap``) against the loop over members, under no_grad.
3. Square's time per query (per image forward pass it spends) against one
   ensemble forward pass per image, on 3 ResNet-18s.
4. Plain, curvature and EDLCM (2 members trained jointly) epochs in fp32
   against bf16 autocast. The regularisers' passes run in fp32 whatever the
   precision (their finite difference needs it), so only their
   cross-entropy passes gain.

On CPU the sizes shrink (``--images``) so that the run ends in minutes.

Usage: python benchmarks/bench_gpu.py [--images N] [--batch 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from fedrobust.attacks import SquareAttack
from fedrobust.data import to_float
from fedrobust.ensemble import LogitAverageEnsemble
from fedrobust.models import build_model
from fedrobust.training import MemberTrainer, TrainSettings, resolve_device
from strategies import build_strategy

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 1) -> float:
    """Best wall time of ``repeats`` calls of ``fn``, the device synchronised before and after each."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def resnet18(device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", 3, 10, MEAN, STD).to(device)


def synthetic(n: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x.to(device), y.to(device)


def bare_epoch(model, x, y, batch_size: int, device: torch.device, seed: int = 0) -> None:
    """The loop a user would write: no strategy, no validation, no checkpoint, no logging."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(device)
    for start in range(0, len(x), batch_size):
        idx = perm[start : start + batch_size]
        xb = to_float(x[idx])
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def ours_epoch(model, x, y, xv, yv, batch_size: int, device: torch.device, strategy="plain", precision="fp32",
               members: int = 1) -> None:
    models = model if isinstance(model, list) else [model]
    settings = TrainSettings(lr=0.05, epochs=1, batch_size=batch_size, patience=5, precision=precision)
    cfg = OmegaConf.create({"name": strategy, **({"h": None} if strategy != "plain" else {})})
    trainer = MemberTrainer(models, x, y, xv, yv, build_strategy(cfg), settings, seed=0, device=device)
    trainer.run(1, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=None, help="training images (default 50000 on CUDA, 1024 on CPU)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    args = p.parse_args()
    device = resolve_device("auto")
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(args.threads)
    n = args.images or (50_000 if on_gpu else 1024)
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; {n} synthetic 3x32x32 images, batch {args.batch}")
    x, y = synthetic(n, device)
    xv, yv = synthetic(max(256, n // 50), device, seed=1)

    # 1. train_member against the bare loop
    warm = min(n, 8 * args.batch)
    bare_epoch(resnet18(device), x[:warm], y[:warm], args.batch, device)
    ours_epoch(resnet18(device), x[:warm], y[:warm], xv, yv, args.batch, device)
    t_bare = timed(lambda: bare_epoch(resnet18(device), x, y, args.batch, device), device)
    t_ours = timed(lambda: ours_epoch(resnet18(device), x, y, xv, yv, args.batch, device), device)
    print("\n1. one ResNet-18 epoch, plain fp32 (images/s)")
    print(f"   bare loop      {n / t_bare:9.1f}")
    print(f"   train_member   {n / t_ours:9.1f}   ratio {t_bare / t_ours:.2f}x of the bare loop (goal >= 0.9x;"
          f" includes validation on {len(xv)} images)")

    # 2. the ensemble forward, vectorised against the loop
    batch = 256 if on_gpu else 64
    xf = to_float(x[:batch])
    print(f"\n2. ensemble forward of ResNet-18s, batch {batch}, no_grad (ms per forward)")
    with torch.no_grad():
        for k in (3, 5, 7):
            members = [resnet18(device, seed=i).eval() for i in range(k)]
            loop = LogitAverageEnsemble(members, vectorise=False)
            vec = LogitAverageEnsemble(members, vectorise=True)
            diff = float((loop(xf) - vec(xf)).abs().max())
            reps = 10 if on_gpu else 2
            t_loop, t_vec = timed(lambda: loop(xf), device, reps), timed(lambda: vec(xf), device, reps)
            print(f"   {k} members   loop {t_loop * 1e3:8.1f}   vectorised {t_vec * 1e3:8.1f}   "
                  f"speed-up {t_loop / t_vec:.2f}x   max |logit diff| {diff:.1e}")
            del members, loop, vec

    # 3. Square per query against one forward pass
    members = [resnet18(device, seed=i).eval() for i in range(3)]
    ens = LogitAverageEnsemble(members)
    queries = 100 if on_gpu else 10
    with torch.no_grad():
        yq = ens(xf).argmax(1)  # every image starts correct
        t_fwd = timed(lambda: ens(xf), device, 5 if on_gpu else 2) / batch
    square = SquareAttack(ens, eps=1e-4, norm="linf", n_queries=queries, seed=0)  # fools nothing: full batches
    result = {}
    t_sq = timed(lambda: result.update(r=square.run(xf, yq)), device)
    t_query = t_sq / float(result["r"].queries.sum())
    print(f"\n3. Square L-inf on 3 ResNet-18s ({'vectorised' if ens.vectorised else 'loop'}), {batch} images, "
          f"{queries} queries")
    print(f"   per query {t_query * 1e3:.3f} ms, one forward {t_fwd * 1e3:.3f} ms per image: ratio {t_query / t_fwd:.2f}x")

    # 4. precision, per strategy
    m = min(n, 4096 if on_gpu else 256)
    xs, ys = x[:m], y[:m]
    print(f"\n4. epoch of {m} images, fp32 against bf16 autocast (s)")
    for strategy, k in (("plain", 1), ("curvature", 1), ("edlcm", 2)):
        row = {}
        for precision in ("fp32", "bf16"):
            def run():
                models = [resnet18(device, seed=i) for i in range(k)]
                ours_epoch(models, xs, ys, xv, yv, args.batch, device, strategy, precision)
            run()  # warm-up (kernels, autotuning)
            row[precision] = timed(run, device)
        print(f"   {strategy:<10} ({k} member{'s' if k > 1 else ''})  fp32 {row['fp32']:7.2f}   bf16 {row['bf16']:7.2f}"
              f"   speed-up {row['fp32'] / row['bf16']:.2f}x")


if __name__ == "__main__":
    main()
