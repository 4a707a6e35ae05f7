import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


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
