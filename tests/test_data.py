import io
import pickle

import numpy as np
import pytest
import torch

from conftest import write_cifar
from fedrobust.data import DataError, _load_cached, load_dataset, to_float


@pytest.fixture(autouse=True)
def _fresh_cache():
    _load_cached.cache_clear()
    yield
    _load_cached.cache_clear()


def test_digits_in_unit_range_with_fixed_stratified_split():
    d = load_dataset("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_train.dtype == torch.float32
    assert float(d.x_train.min()) == 0.0 and float(d.x_train.max()) == 1.0
    assert len(d.x_train) + len(d.x_test) == 1797
    train_frac = np.bincount(d.y_train.numpy()) / len(d.y_train)
    test_frac = np.bincount(d.y_test.numpy()) / len(d.y_test)
    assert np.abs(train_frac - test_frac).max() < 0.01  # stratified
    _load_cached.cache_clear()
    again = load_dataset("digits")
    assert torch.equal(again.y_test, d.y_test) and torch.equal(again.x_test, d.x_test)


def test_digits_equal_scikit_learns_load_digits_and_split_without_importing_it():
    """The stored split is scikit-learn's stratified split, image for image and in the same order."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from fedrobust.data import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(images, bunch.target.astype(np.int64), test_size=DIGITS_TEST_FRACTION,
                                              stratify=bunch.target, random_state=DIGITS_SPLIT_SEED)
    d = load_dataset("digits")
    assert torch.equal(d.x_train, torch.from_numpy(x_tr)) and torch.equal(d.y_train, torch.from_numpy(y_tr))
    assert torch.equal(d.x_test, torch.from_numpy(x_te)) and torch.equal(d.y_test, torch.from_numpy(y_te))
    # and the same strides: with one channel they pick the convolution kernels, and so the figures' round-off
    assert d.x_train.stride() == torch.from_numpy(x_tr).stride() and d.x_test.stride() == torch.from_numpy(x_te).stride()
    code = "import sys; from fedrobust.data import load_dataset; load_dataset('digits'); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
@pytest.mark.parametrize("as_tarball", [False, True])
def test_cifar_loader_reads_real_format(tmp_path, name, classes, as_tarball):
    write_cifar(tmp_path, name, n_train_per_file=4, n_test=7, as_tarball=as_tarball, seed=1)
    d = load_dataset(name, tmp_path)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (7, 3, 32, 32)
    assert d.x_train.dtype == torch.uint8 and d.num_classes == classes
    xf = to_float(d.x_train)
    assert 0.0 <= float(xf.min()) and float(xf.max()) <= 1.0
    # pixel layout: row-major 1024 red, then green, then blue
    rng = np.random.default_rng(1)  # replay the writer's draws for the first batch file
    n_first = 4 if name == "cifar10" else 20
    first_labels = rng.integers(0, classes, n_first)
    first_data = rng.integers(0, 256, (n_first, 3072), dtype=np.uint8)
    assert d.y_train[:n_first].tolist() == first_labels.tolist()
    assert torch.equal(d.x_train[0, 1], torch.from_numpy(first_data[0, 1024:2048].reshape(32, 32)))


def test_missing_archive_says_what_where(tmp_path):
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", tmp_path / "nowhere")
    msg = str(exc.value)
    assert "cifar-10-batches-py" in msg and "cifar-10-python.tar.gz" in msg and "nowhere" in msg
    assert "\n" not in msg


def test_corrupt_tarball_is_one_line(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball at all")
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", tmp_path)
    assert "cifar-10-python.tar.gz" in str(exc.value) and "\n" not in str(exc.value)


def test_corrupt_batch_is_one_line(tmp_path):
    base = write_cifar(tmp_path, "cifar10")
    (base / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", tmp_path)
    assert "data_batch_3" in str(exc.value) and "\n" not in str(exc.value)


def test_missing_batch_file_is_named(tmp_path):
    base = write_cifar(tmp_path, "cifar10")
    (base / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("owned",))


def test_unpickler_refuses_code(tmp_path):
    base = write_cifar(tmp_path, "cifar10")
    buf = io.BytesIO()
    pickle.dump({b"data": _Evil(), b"labels": [0]}, buf, protocol=2)
    (base / "data_batch_1").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="forbidden"):
        load_dataset("cifar10", tmp_path)
