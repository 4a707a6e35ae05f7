"""Content-addressed cache for heavy artefacts (surrogate zoos, transfer examples).

A key is the SHA-256 of a canonical JSON description of everything the
artefact depends on. Entries are written to a temporary name and renamed, so
an interrupted write never leaves a half entry. Tensors are loaded with
``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..atomic import save_torch, write_json

__all__ = ["cache_root", "content_key", "load_tensors", "save_tensors", "tensor_fingerprint"]


def cache_root(configured: str = "") -> Path:
    root = configured or os.environ.get("FEDROBUST_CACHE") or str(Path.home() / ".cache" / "fedrobust")
    return Path(root).expanduser()


def content_key(description: dict[str, Any]) -> str:
    blob = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def tensor_fingerprint(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:24]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch({k: v.detach().cpu() for k, v in tensors.items()}, path)
    if meta is not None:
        write_json(path.with_suffix(".json"), meta, default=str)


def load_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt entry is recomputed, never trusted
        return None
