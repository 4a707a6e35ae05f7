"""Atomic file writes: a file is either its old self or its new self, never half of each.

Every file the project writes whole (``results.json``, ``eval_sample.json``,
configs, reports, figures, study files, checkpoints, cache entries) goes
through :func:`atomic_open`: the content is written to a temporary file in the
same directory, flushed to disk, and renamed over the target with
:func:`os.replace`, which POSIX and Windows make atomic within a file system.
A kill, a full disk or an exception during the write leaves the previous file
untouched and removes the temporary one (a SIGKILL may leave a ``.*.tmp``
file beside it, never a damaged target). Append-only logs (``train.log``,
TensorBoard events, ``executions.jsonl``) are not rewritten and do not need it.

Every JSON text is strict JSON (:func:`dumps_json`): a non-finite float
(NaN, ±inf), which ``json`` would write as the invalid ``NaN`` or
``Infinity``, is written as ``null``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .interrupt import deferred

__all__ = ["atomic_open", "dumps_json", "finite_or_null", "remove_leftovers", "save_figure", "save_torch", "write_bytes",
           "write_json", "write_text"]

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files (mode 'w' or 'wb'), not {mode!r}")
    path = Path(path)
    tmp = f = None
    try:
        with deferred():  # the temporary file is named (and closed on any exit) before a signal is taken
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            f = os.fdopen(fd, mode, **kwargs)
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from the user's group
        os.replace(tmp, path)
    except BaseException:
        if f is not None:
            f.close()
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Remove the temporary files that writers killed outright left under ``folder`` (only once no
    writer can be running there: a killed process's); the paths removed."""
    folder = Path(folder)
    found = [p for p in folder.rglob(".*.tmp") if p.is_file()] if folder.is_dir() else []
    for path in found:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return found


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every non-finite float, in any dict, list or tuple inside it, replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that writes strict JSON: non-finite floats become null (:func:`finite_or_null`)."""
    return json.dumps(finite_or_null(obj), allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any, **kwargs: Any) -> None:
    """Write ``obj`` as strict, indented JSON (non-finite floats as null)."""
    write_text(path, dumps_json(obj, indent=2, **kwargs))


def save_torch(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """``fig.savefig`` to ``path`` atomically (the format comes from the suffix of ``path``)."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", **kwargs)
