"""Attack speed against its physical floor, measured in one run on the same ensemble and images.

* Square: wall time per query (per image forward pass it spends) against one
  plain forward pass of the ensemble on the same batch, per image. Goal <= 1.5x.
* CWA: one outer iteration against one MI-FGSM iteration on the same surrogate
  ensemble. CWA does 2K model passes per iteration (the ensemble's reverse
  step plus K inner steps) against MI-FGSM's K. Goal <= 2.3x.

Usage: python benchmarks/bench_attacks.py [--model cnn] [--members 3] [--batch 360] [--image 8|32]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedrobust.ensemble import LogitAverageEnsemble
from fedrobust.attacks import CWA, MIFGSM, SquareAttack
from fedrobust.models import build_model


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cnn")
    p.add_argument("--members", type=int, default=3)
    p.add_argument("--batch", type=int, default=360)
    p.add_argument("--image", type=int, default=8, help="8: digits-sized 1x8x8, 32: CIFAR-sized 3x32x32")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    c = 1 if args.image == 8 else 3
    torch.manual_seed(0)
    members = [build_model(args.model, c, 10, [0.5] * c, [0.25] * c).eval() for _ in range(args.members)]
    ens = LogitAverageEnsemble(members)
    x = torch.rand(args.batch, c, args.image, args.image)
    with torch.no_grad():
        y = ens(x).argmax(1)  # every image starts correctly classified

    # --- Square: time per query vs one forward pass, per image
    with torch.no_grad():
        ens(x)
        t_fwd = _best_time(lambda: ens(x), 5) / args.batch
    eps = 1e-4  # too small to fool anything: every image stays active, every iteration is a full batch
    sq = SquareAttack(ens, eps=eps, norm="linf", n_queries=args.queries, seed=0)
    result = {}
    t_sq = _best_time(lambda: result.update(r=sq.run(x, y)), 2)
    queries = int(result["r"].queries.sum())
    t_query = t_sq / queries
    print(f"square linf: {t_query * 1e6:.2f} us/query vs forward {t_fwd * 1e6:.2f} us/image "
          f"-> ratio {t_query / t_fwd:.2f} (goal <= 1.5)")
    sq2 = SquareAttack(ens, eps=eps, norm="l2", n_queries=args.queries, seed=0)
    t_sq2 = _best_time(lambda: result.update(r=sq2.run(x, y)), 2)
    t_query2 = t_sq2 / int(result["r"].queries.sum())
    print(f"square l2:   {t_query2 * 1e6:.2f} us/query -> ratio {t_query2 / t_fwd:.2f}")

    # --- CWA vs MI-FGSM, one iteration each on the same surrogates and batch
    eps = 8 / 255
    cwa, mi = CWA(members, eps, steps=1), MIFGSM(ens, eps, steps=1)
    z = torch.zeros_like(x)
    t_cwa = _best_time(lambda: cwa.step(x, x, y, z, z), 5)
    t_mi = _best_time(lambda: mi.step(x, x, y, z), 5)
    print(f"cwa iteration {t_cwa * 1e3:.1f} ms vs mi-fgsm iteration {t_mi * 1e3:.1f} ms "
          f"-> ratio {t_cwa / t_mi:.2f} (goal <= 2.3; pass count ratio 2.0)")


if __name__ == "__main__":
    main()
