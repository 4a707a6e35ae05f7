"""Deployments as shards: index arrays into the training set, one per node.

IID and Dirichlet shards come from flwr-datasets' ``IidPartitioner`` and
``DirichletPartitioner``, run on a local ``datasets.Dataset`` that holds only
the labels and the row index. The partition seed is
``deployment.partition_seed``, independent of the training seed, so the shards
stay fixed across training seeds.

Every shard is then split into train/validation (``data.val_fraction``) with
the same seed.

With ``deployment.server_images`` > 0, that many training images are drawn
first (:func:`server_indices`, seeded by the partition seed) and kept by the
server to screen members (:mod:`fedrobust.screening`); the nodes are
partitioned from the rest, so no node ever holds one of them.

Importing flwr-datasets costs about 3.6 s per process (it imports the
``datasets`` library, seaborn and scipy.stats for its plots), and every node,
Ray worker and trial process partitions. So IID and Dirichlet partitions are
cached on disk, under ``$FEDROBUST_CACHE/shards/`` (default
``~/.cache/fedrobust``), keyed by the labels, the deployment, its parameters and
the flwr-datasets version; only a miss imports flwr-datasets. An unreadable
entry is recomputed, and an unwritable cache is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np

from .atomic import write_json

__all__ = [
    "NodeShard",
    "PartitionError",
    "members_per_node",
    "num_nodes",
    "partition_indices",
    "node_shards",
    "server_indices",
    "class_counts_table",
]


class PartitionError(ValueError):
    """A deployment that the data cannot support."""


@dataclass(frozen=True)
class NodeShard:
    """One node's data: train and validation indices into the training set."""

    node: int
    train: np.ndarray
    val: np.ndarray


def num_nodes(deployment: str, n: int) -> int:
    """How many Flower nodes a deployment uses."""
    return n if deployment.startswith("distributed") else 1


def members_per_node(deployment: str, n: int) -> int:
    """How many members each node trains (all N on one node for non-distributed deployments)."""
    return 1 if deployment.startswith("distributed") else n


def _label_dataset(labels: np.ndarray):
    from datasets import Dataset

    return Dataset.from_dict({"label": labels.astype(np.int64), "row": np.arange(len(labels), dtype=np.int64)})


def _shard_cache_file(labels: np.ndarray, deployment: str, n: int, alpha: float, seed: int) -> Path:
    h = hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update(json.dumps([deployment, n, float(alpha) if deployment == "distributed_dirichlet" else None, seed,
                         metadata.version("flwr-datasets")]).encode())
    root = Path(os.environ.get("FEDROBUST_CACHE") or Path.home() / ".cache" / "fedrobust").expanduser()
    return root / "shards" / f"{deployment}-{h.hexdigest()[:24]}.json"


def partition_indices(
    labels: np.ndarray, deployment: str, n: int, alpha: float = 0.9, seed: int = 123
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into the deployment's node shards (cached on disk, see the module docstring)."""
    labels = np.asarray(labels)
    if n < 1:
        raise PartitionError(f"deployment.num_nodes: must be >= 1, got {n}")
    if deployment in ("centralized", "deep_ensemble"):
        return [np.arange(len(labels), dtype=np.int64)]
    if n > len(labels):
        raise PartitionError(f"deployment.num_nodes: {n} nodes but only {len(labels)} training samples")
    if deployment not in ("distributed_iid", "distributed_dirichlet"):
        raise PartitionError(f"deployment.name: unknown deployment '{deployment}'")
    path = _shard_cache_file(labels, deployment, n, alpha, seed)
    try:
        shards = [np.asarray(s, dtype=np.int64).reshape(-1) for s in json.loads(path.read_text())["shards"]]
        every = np.concatenate(shards) if shards else np.zeros(0, dtype=np.int64)
        if (len(shards) == n and len(every) and every.min() >= 0 and every.max() < len(labels)
                and len(np.unique(every)) == len(every)):  # disjoint indices into this data set
            return shards
    except (OSError, ValueError, KeyError, TypeError):
        pass  # a miss, or an entry not to trust: partition again
    shards = _partition(labels, deployment, n, alpha, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"deployment": deployment, "num_nodes": n, "alpha": alpha, "seed": seed,
                          "shards": [s.tolist() for s in shards]})
    except OSError:
        pass  # a read-only cache: partition every time
    return shards


def _partition(labels: np.ndarray, deployment: str, n: int, alpha: float, seed: int) -> list[np.ndarray]:
    if deployment == "distributed_iid":
        from flwr_datasets.partitioner import IidPartitioner

        # IidPartitioner shards contiguously, so shuffle with the partition seed first.
        partitioner = IidPartitioner(num_partitions=n)
        partitioner.dataset = _label_dataset(labels).shuffle(seed=seed)
    elif deployment == "distributed_dirichlet":
        from flwr_datasets.partitioner import DirichletPartitioner

        partitioner = DirichletPartitioner(
            num_partitions=n,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min(10, max(2, len(labels) // (2 * n))),
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
        partitioner.dataset = _label_dataset(labels)
    try:
        return [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64) for i in range(n)]
    except ValueError as exc:
        hint = "; try a larger deployment.alpha (e.g. 2), fewer nodes, or distributed_iid" if deployment == "distributed_dirichlet" else ""
        raise PartitionError(f"deployment: cannot partition {len(labels)} samples into {n} nodes ({exc}){hint}") from None


def server_indices(num_images: int, n: int, seed: int) -> np.ndarray:
    """The ``n`` training images the server keeps for itself (sorted indices), drawn with the partition seed."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if n >= num_images:
        raise PartitionError(f"deployment.server_images: {n} server images but the training split has {num_images}")
    return np.sort(np.random.default_rng([seed, 0x5E4]).choice(num_images, size=n, replace=False)).astype(np.int64)


@lru_cache(maxsize=16)
def _cached_shards(labels_bytes: bytes, deployment: str, n: int, alpha: float, seed: int, val_fraction: float,
                   server_images: int = 0):
    labels = np.frombuffer(labels_bytes, dtype=np.int64)
    rest = np.setdiff1d(np.arange(len(labels), dtype=np.int64), server_indices(len(labels), server_images, seed))
    shards = []
    for node, idx in enumerate(partition_indices(labels[rest], deployment, n, alpha, seed)):
        idx = rest[idx]  # indices into the whole training split
        if len(idx) < 2:
            raise PartitionError(f"deployment.num_nodes: node {node} gets {len(idx)} samples, too few to split train/validation")
        rng = np.random.default_rng([seed, node])
        perm = rng.permutation(idx)
        n_val = min(len(idx) - 1, max(1, int(round(val_fraction * len(idx)))))
        shards.append(NodeShard(node=node, train=np.sort(perm[n_val:]), val=np.sort(perm[:n_val])))
    return tuple(shards)


def node_shards(
    labels: np.ndarray, deployment: str, n: int, alpha: float, seed: int, val_fraction: float = 0.2,
    server_images: int = 0,
) -> tuple[NodeShard, ...]:
    """Every node's train/validation split (cached per process by content), none holding a server image."""
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    return _cached_shards(labels.tobytes(), deployment, n, float(alpha), int(seed), float(val_fraction),
                          int(server_images))


def class_counts_table(counts: dict[int, list[int]], title: str = "samples per class") -> str:
    """A plain-text table: one row per node, one column per class, plus the total."""
    num_classes = max(len(c) for c in counts.values())
    head = ["node"] + [str(c) for c in range(num_classes)] + ["total"]
    rows = [[str(node)] + [str(v) for v in row] + [str(sum(row))] for node, row in sorted(counts.items())]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.rjust(w) for v, w in zip(r, widths))  # noqa: E731
    lines = [title, fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)
