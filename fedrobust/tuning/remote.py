"""What crosses between the tuner and its trials when they run on other machines, through Ray alone.

No shared file system is assumed. A trial works in node-local scratch space
(``$FEDROBUST_SCRATCH`` on the node, else ``<tmp>/fedrobust-scratch``) and
never writes into the study directory: its finished run directory is
streamed back as a sequence of items of at most :data:`CHUNK` bytes (a Ray
streaming generator, consumed one item at a time), and the tuner alone
writes it under ``STUDY_DIR/trials/``. The other way, the tuner puts the
surrogate zoo and its transfer examples into Ray's object store once; a
node whose cache lacks them writes them into its own cache, so a machine
that joins the cluster never trains the zoo again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CHUNK", "scratch_root", "send_dir", "receive_dir", "pack_files", "install_files"]

CHUNK = 4 << 20  # bytes per streamed item: what the tuner holds of a trial's files at any time


def scratch_root() -> Path:
    """This node's scratch space for trials: ``$FEDROBUST_SCRATCH``, else ``<tmp>/fedrobust-scratch``."""
    root = os.environ.get("FEDROBUST_SCRATCH") or str(Path(tempfile.gettempdir()) / "fedrobust-scratch")
    return Path(root).expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def send_dir(root: Path) -> Iterator[dict[str, Any] | bytes]:
    """A directory as items: per file a header (path, size, sha256) and its bytes in chunks; then a trailer."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    total = 0
    for path in files:
        size = path.stat().st_size
        yield {"file": path.relative_to(root).as_posix(), "size": size, "sha256": _sha256(path)}
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                yield block
        total += size
    yield {"done": True, "files": len(files), "bytes": total}


def receive_dir(items: Iterable[dict[str, Any] | bytes], dest: Path) -> dict[str, Any]:
    """Write the items of :func:`send_dir` to ``dest``: into ``dest.partial`` first, renamed when whole.

    Sizes and checksums are checked; any gap raises and leaves ``dest`` untouched.
    """
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    current = None
    try:
        for item in items:
            if isinstance(item, dict) and item.get("done"):
                _close(current)
                current = None
                if dest.exists():  # a killed earlier attempt of the same trial
                    shutil.rmtree(dest)
                os.replace(partial, dest)
                return item
            if isinstance(item, dict):
                _close(current)
                rel = Path(item["file"])
                if rel.is_absolute() or ".." in rel.parts:
                    raise ValueError(f"refused file name {item['file']!r} in a trial's run directory")
                target = partial / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                current = {"f": open(target, "wb"), "meta": item, "h": hashlib.sha256(), "n": 0}
            else:
                if current is None:
                    raise ValueError("file data without a header")
                current["f"].write(item)
                current["h"].update(item)
                current["n"] += len(item)
        raise ValueError("the stream ended before the whole run directory arrived")
    except BaseException:
        if current is not None:
            current["f"].close()
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _close(current: dict | None) -> None:
    if current is None:
        return
    current["f"].close()
    meta = current["meta"]
    if current["n"] != meta["size"] or current["h"].hexdigest() != meta["sha256"]:
        raise ValueError(f"{meta['file']}: received {current['n']} of {meta['size']} bytes or a wrong checksum")


def pack_files(root: Path, names: list[str]) -> dict[str, np.ndarray]:
    """Cache files (relative to ``root``) as byte arrays, which Ray stores without copying them again."""
    return {name: np.fromfile(root / name, dtype=np.uint8) for name in names}


def install_files(root: Path, names: list[str], holder: list | None) -> list[str]:
    """Write into ``root`` the files of ``names`` it lacks, from ``holder[0]`` (an object ref of
    :func:`pack_files`), fetching that object only if something is missing. Returns what was written."""
    missing = [n for n in names if not (root / n).is_file()]
    if not missing or not holder:
        return []
    import ray

    files = ray.get(holder[0])
    for name in missing:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        files[name].tofile(tmp)
        os.replace(tmp, target)
    return missing
