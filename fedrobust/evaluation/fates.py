"""Every image's fate under every attack, kept in the run directory; the unions over attacks built from them.

An evaluation writes one file per record in ``fates/`` beside its
``results.json`` (NumPy ``.npz``, read with ``numpy.load``; no pickles):

==================  ==========================================================
``indices``         int64 (n,): the sample's images, as indices into ``split``
``split``           str: ``test`` (indices into the test set) or ``validation``
                    (indices into the training set)
``key``             str: the evaluation's key (``results.json``'s
                    ``evaluation.key``): members, attack settings and sample
``ensemble``        bool (n,): the image withstood the attack on the ensemble
                    (classified correctly at the clean point and at every
                    point the attack evaluated or answered)
``members``         bool (M, n), where the attack ran on each member
``queries``         int64 (n,), query attacks: forward passes spent on the
                    image (0 where it was misclassified at the clean point)
``fallback``        bool (n,), white-box attacks with ``attack.nonfinite=ce``:
                    cross-entropy stood in for a non-finite loss
==================  ==========================================================

Records are named as ``results.json``'s attack entries (``transfer_cwa``,
``query_square_linf``, ``whitebox_apgd``, ...); ``clean.npz`` holds the
clean correctness (``ensemble`` and ``members``). A resumed evaluation reuses
the records of its finished stages, ``fedrobust report RUN_DIR`` and
``fedrobust compare`` read them.

Unions (:func:`unions`): an image is robust under a set of attacks only if
it withstood each of them; the evaluation forms them over the attacks of one
budget: the L-inf ones at ``attack.eps``, and, where two or more ran, the L2
ones at ``attack.eps_l2`` (the same unions, named with ``_l2``: ``whitebox_l2``,
``whitebox_query_l2``, ``all_l2``). A union's accuracy is at most every one of
its attacks' accuracies, image by image. ``whitebox`` covers the white-box
attacks that ran, ``whitebox_query`` the white-box and query attacks (every
attack on the model itself: AutoAttack's figure, with ``attack=autoattack``),
``all`` every transfer, query and white-box attack that ran (every threat
model); each union lists its attacks.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..atomic import write_bytes
from ..stats import interval

__all__ = ["FATES", "KINDS", "figure", "load_fates", "save_fate", "unions"]

FATES = "fates"
KINDS = ("transfer", "query", "whitebox")  # the threat models whose attacks enter the unions


def save_fate(folder: Path, record: str, key: str, split: str, indices: np.ndarray, **arrays: np.ndarray) -> Path:
    """Write one record (atomically) to ``folder/fates/record.npz``."""
    buf = io.BytesIO()
    np.savez_compressed(buf, indices=np.asarray(indices, dtype=np.int64), split=np.array(split), key=np.array(key),
                        **{k: np.asarray(v) for k, v in arrays.items() if v is not None})
    path = Path(folder) / FATES / f"{record}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buf.getvalue())
    return path


def _read(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            doc = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, KeyError):
        return None  # a damaged record: the stage runs again
    if not {"indices", "split", "key", "ensemble"} <= set(doc):
        return None
    doc["split"], doc["key"] = str(doc["split"]), str(doc["key"])
    return doc


def load_fates(folder: Path, key: str | None = None) -> dict[str, dict[str, np.ndarray]]:
    """The records in ``folder/fates`` (of the evaluation ``key``, if given), by name."""
    out = {}
    for path in sorted((Path(folder) / FATES).glob("*.npz")):
        doc = _read(path)
        if doc is not None and (key is None or doc["key"] == key):
            out[path.stem] = doc
    return out


def _kind(record: str) -> str | None:
    kind = record.split("_", 1)[0]
    return kind if kind in KINDS else None


def figure(robust) -> dict:
    """A robust accuracy as ``results.json`` records it: the share, its counts and its 95% (Wilson) interval."""
    robust = np.asarray(robust, dtype=bool)
    k, n = int(robust.sum()), len(robust)
    return {"robust_accuracy": k / n if n else 0.0, "robust_images": k, "num_images": n, "interval": interval(k, n)}


def _union(records: dict[str, dict[str, np.ndarray]], names: list[str], field: str, row: int | None = None) -> dict:
    robust = None
    for name in names:
        r = records[name][field]
        r = (r if row is None else r[row]).astype(bool)
        robust = r if robust is None else robust & r
    return {**figure(robust), "attacks": names}


def unions(records: dict[str, dict[str, np.ndarray]]) -> tuple[dict, list[dict]]:
    """The unions of the ensemble, and of each member (over the attacks that ran on every member)."""
    attacks = [name for name in records if _kind(name)]
    whitebox = [name for name in attacks if _kind(name) == "whitebox"]
    ensemble = {}
    if whitebox:
        ensemble["whitebox"] = _union(records, whitebox, "ensemble")
    on_target = [name for name in attacks if _kind(name) in ("whitebox", "query")]
    if whitebox and len(on_target) > len(whitebox):  # every attack on the model itself: AutoAttack's figure
        ensemble["whitebox_query"] = _union(records, on_target, "ensemble")
    if attacks:
        ensemble["all"] = _union(records, attacks, "ensemble")
    on_members = [name for name in attacks if "members" in records[name]]
    num_members = min((len(records[name]["members"]) for name in on_members), default=0)
    members = [{"all": _union(records, on_members, "members", m)} if on_members else {} for m in range(num_members)]
    return ensemble, members
