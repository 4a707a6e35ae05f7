import os
import pickle
import signal
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


_RAY_MARKERS = ("raylet", "gcs_server", "ray::", "default_worker.py", "ray start", "frray-")  # frray-: tests/raycluster.py


def _ray_processes() -> dict[int, str]:
    """Live Ray processes on this machine: pid -> command line."""
    from raycluster import live_processes

    return {pid: cmd for pid, cmd in live_processes().items() if any(m in cmd for m in _RAY_MARKERS)}


@pytest.fixture(scope="session", autouse=True)
def _no_ray_process_left_behind():
    """Fail the session if a Ray process that a test started still runs at the end (then stop it, by id)."""
    before = set(_ray_processes())
    yield
    deadline = time.time() + 30  # a local instance's services take a moment to exit after ray.shutdown()
    left = {}
    while time.time() < deadline:
        left = {p: c for p, c in _ray_processes().items() if p not in before}
        if not left:
            return
        time.sleep(0.5)
    from raycluster import TEMP_PREFIX, descendants

    ours = descendants(os.getpid())
    for pid, cmd in left.items():  # stop only what this session started: its descendants and its test nodes
        if pid in ours or TEMP_PREFIX in cmd:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    raise AssertionError("Ray processes left running by the tests (those this session started are now killed): "
                         + "; ".join(f"{p}: {c[:120]}" for p, c in sorted(left.items())))


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Every test runs in its own folder with its own cache, so nothing touches the repo or ~/.cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDROBUST_CACHE", str(tmp_path / "fedrobust-cache"))


def write_cifar(root: Path, name: str = "cifar10", n_train_per_file: int = 6, n_test: int = 8, as_tarball: bool = False, seed: int = 0) -> Path:
    """Write a tiny CIFAR archive in the real python format (pickled dicts of bytes keys)."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, label_key, n_classes = "cifar-10-batches-py", b"labels", 10
        files = {f"data_batch_{i}": n_train_per_file for i in range(1, 6)} | {"test_batch": n_test}
        meta = {"batches.meta": {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}}
    else:
        folder, label_key, n_classes = "cifar-100-python", b"fine_labels", 100
        files = {"train": 5 * n_train_per_file, "test": n_test}
        meta = {"meta": {b"fine_label_names": [f"c{i}".encode() for i in range(100)]}}
    base = root / folder
    base.mkdir(parents=True, exist_ok=True)
    for fname, n in files.items():
        batch = {
            b"batch_label": fname.encode(),
            label_key: [int(v) for v in rng.integers(0, n_classes, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }
        if name == "cifar100":
            batch[b"coarse_labels"] = [int(v) // 5 for v in batch[label_key]]
        with open(base / fname, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    for fname, obj in meta.items():
        with open(base / fname, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    if as_tarball:
        tar_name = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
        with tarfile.open(root / tar_name, "w:gz") as tar:
            tar.add(base, arcname=folder)
        for p in base.iterdir():
            p.unlink()
        base.rmdir()
        return root / tar_name
    return base
