"""The IDX reader on files written here in the real format (raw and gzipped), good and bad."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from fedrobust.data import DataError
from fedrobust.idx import read_idx, read_idx_pair


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) in the IDX format: magic 0x0000_08_ndim, big-endian sizes, the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_pair(folder, n=12, size=(28, 28), classes=10, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, *size), dtype=np.uint8)
    y = rng.integers(0, classes, n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    paths = folder / f"train-images-idx3-ubyte{suffix}", folder / f"train-labels-idx1-ubyte{suffix}"
    for path, array in zip(paths, (x, y)):
        blob = idx_bytes(array)
        path.write_bytes(gzip.compress(blob) if gz else blob)
    return paths, x, y


@pytest.mark.parametrize("gz", [False, True])
def test_a_pair_reads_back_exactly(tmp_path, gz):
    (images, labels), x, y = write_pair(tmp_path, gz=gz)
    got_x, got_y = read_idx_pair(images, labels)
    assert got_x.shape == (12, 1, 28, 28) and got_x.dtype == np.uint8
    assert np.array_equal(got_x[:, 0], x) and np.array_equal(got_y, y.astype(np.int64))


def test_gzip_is_recognised_by_its_bytes_not_its_name(tmp_path):
    (images, labels), x, _ = write_pair(tmp_path, gz=True)
    renamed = tmp_path / "images-without-suffix"
    images.rename(renamed)
    assert np.array_equal(read_idx(renamed, 3), x)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("damage,match", [
    (lambda b: b"\x00\x00\x08\x01" + b[4:], "magic number 0x00000801, expected 0x00000803"),  # a labels file
    (lambda b: b"\x00\x00\x0d\x03" + b[4:], "magic number 0x00000d03"),  # floats
    (lambda b: b"PK\x03\x04" + b[4:], "not an IDX file"),
    (lambda b: b[:10], "header is cut short"),
    (lambda b: b[:2], "too short for an IDX header"),
    (lambda b: b[:-5], r"truncated: 9403 bytes of data for shape \(12, 28, 28\), expected 9408"),
    (lambda b: b + b"\x00", "longer than its header says"),
])
def test_a_bad_images_file_is_named_with_what_is_wrong(tmp_path, damage, match):
    (images, labels), _, _ = write_pair(tmp_path)
    images.write_bytes(damage(images.read_bytes()))
    with pytest.raises(DataError, match=match) as exc:
        read_idx_pair(images, labels)
    assert _one_line(exc).startswith(str(images))


def test_a_truncated_gzip_file_is_named(tmp_path):
    (images, labels), _, _ = write_pair(tmp_path, gz=True)
    images.write_bytes(images.read_bytes()[:200])
    with pytest.raises(DataError, match="damaged or truncated gzip") as exc:
        read_idx_pair(images, labels)
    assert _one_line(exc).startswith(str(images))


def test_labels_are_checked_against_the_images(tmp_path):
    (images, labels), _, y = write_pair(tmp_path)
    labels.write_bytes(idx_bytes(y[:-1]))
    with pytest.raises(DataError, match="11 labels for the 12 images") as exc:
        read_idx_pair(images, labels)
    assert _one_line(exc).startswith(str(labels))
    bad = y.copy()
    bad[3] = 10
    labels.write_bytes(idx_bytes(bad))
    with pytest.raises(DataError, match=r"label 10 outside 0\.\.9"):
        read_idx_pair(images, labels)


def test_the_image_size_is_checked(tmp_path):
    (images, labels), _, _ = write_pair(tmp_path, size=(32, 32))
    with pytest.raises(DataError, match="images of 32x32 pixels, expected 28x28"):
        read_idx_pair(images, labels)
    x, _ = read_idx_pair(images, labels, image_size=(32, 32))
    assert x.shape == (12, 1, 32, 32)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="cannot be read") as exc:
        read_idx(tmp_path / "absent", 3)
    assert _one_line(exc).startswith(str(tmp_path / "absent"))
