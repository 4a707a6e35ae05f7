"""How a Flower simulation grows with the number of nodes: N = 3, 10, 30, 100 on digits.

Each cell is ``fedrobust train engine=simulation deployment=D deployment.num_nodes=N
train.epochs=E`` in a fresh process (its own private Ray instance, start-up
included), followed by loading the ensemble from the run directory and
scoring its clean accuracy on the test set. Printed per cell: wall time,
wall time per node, the server process's peak RSS (the driver, where the
ServerApp collects and checks every member; the client actors are other
processes), and the time to load and evaluate the ensemble. Dirichlet
cells that flwr-datasets cannot partition with the default alpha = 0.9 are
reported as such and run again with alpha = 2.

Usage: python benchmarks/bench_scale.py [--nodes 3 10 30 100] [--epochs 3] [--deployments distributed_iid distributed_dirichlet]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CELL = textwrap.dedent("""
    import json, resource, sys, time
    from fedrobust.cli import main
    run_dir, overrides = sys.argv[1], sys.argv[2:]
    t0 = time.perf_counter()
    code = main(["train", "engine=simulation", "train.progress=false", f"run_dir={run_dir}", *overrides])
    wall = time.perf_counter() - t0
    out = {"code": code, "wall_s": wall}
    if code == 0:
        from fedrobust import load_ensemble
        from fedrobust.data import load_dataset
        from fedrobust.training import evaluate_model
        t1 = time.perf_counter()
        ens = load_ensemble(run_dir).eval()
        data = load_dataset("digits")
        _, acc = evaluate_model(ens, data.x_test, data.y_test)
        out |= {"eval_s": time.perf_counter() - t1, "accuracy": acc, "members": len(ens.members)}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH " + json.dumps(out))
""")


def run_cell(deployment: str, n: int, epochs: int, out: Path, alpha: float = 0.9) -> dict:
    run_dir = out / f"{deployment}-{n}-{alpha}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    done = subprocess.run([sys.executable, "-c", CELL, str(run_dir), f"deployment={deployment}",
                           f"deployment.num_nodes={n}", f"deployment.alpha={alpha}", f"train.epochs={epochs}"],
                          capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    if not lines:
        raise RuntimeError(f"{deployment} N={n} crashed:\n{done.stderr[-2000:]}")
    res = json.loads(lines[-1][len("BENCH "):])
    if res["code"] != 0:
        errs = [line for line in done.stderr.splitlines() if line.startswith("fedrobust: error:")]
        res["error"] = errs[-1][len("fedrobust: error: "):] if errs else "failed"
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, nargs="+", default=[3, 10, 30, 100])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--deployments", nargs="+", default=["distributed_iid", "distributed_dirichlet"])
    p.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_scale_"))
    print(f"digits, {args.epochs} epochs, engine=simulation (1 CPU per client), {os.cpu_count()} cores; runs in {out}")
    head = f"{'deployment':<22} {'N':>4} {'wall s':>7} {'s/node':>7} {'server peak MB':>14} {'eval s':>7} {'clean acc':>9}"
    print(head)
    print("-" * len(head))
    for deployment in args.deployments:
        # Dirichlet(0.9) is the default; where flwr-datasets cannot partition with it, try alpha = 2.
        alphas = [0.9, 2.0] if deployment == "distributed_dirichlet" else [0.9]
        for n in args.nodes:
            for alpha in alphas:
                name = deployment if deployment != "distributed_dirichlet" else f"dirichlet alpha={alpha:g}"
                r = run_cell(deployment, n, args.epochs, out, alpha)
                if r["code"] != 0:
                    print(f"{name:<22} {n:>4}  cannot run: {r['error'][:110]}", flush=True)
                    continue
                print(f"{name:<22} {n:>4} {r['wall_s']:>7.1f} {r['wall_s'] / n:>7.2f} {r['peak_rss_mb']:>14.0f} "
                      f"{r['eval_s']:>7.2f} {r['accuracy']:>9.4f}", flush=True)
                break


if __name__ == "__main__":
    main()
