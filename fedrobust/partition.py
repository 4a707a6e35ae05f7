"""Deployments as shards: index arrays into the training set, one per node.

IID and Dirichlet shards come from flwr-datasets' ``IidPartitioner`` and
``DirichletPartitioner``, run on a local ``datasets.Dataset`` that holds only
the labels and the row index. The partition seed is
``deployment.partition_seed``, independent of the training seed, so the shards
stay fixed across training seeds.

Every shard is then split into train/validation (``data.val_fraction``) with
the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "NodeShard",
    "PartitionError",
    "members_per_node",
    "num_nodes",
    "partition_indices",
    "node_shards",
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


def partition_indices(
    labels: np.ndarray, deployment: str, n: int, alpha: float = 0.9, seed: int = 123
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into the deployment's node shards."""
    labels = np.asarray(labels)
    if n < 1:
        raise PartitionError(f"deployment.num_nodes: must be >= 1, got {n}")
    if deployment in ("centralized", "deep_ensemble"):
        return [np.arange(len(labels), dtype=np.int64)]
    if n > len(labels):
        raise PartitionError(f"deployment.num_nodes: {n} nodes but only {len(labels)} training samples")
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
    else:
        raise PartitionError(f"deployment.name: unknown deployment '{deployment}'")
    try:
        return [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64) for i in range(n)]
    except ValueError as exc:
        hint = "; try a larger deployment.alpha (e.g. 2), fewer nodes, or distributed_iid" if deployment == "distributed_dirichlet" else ""
        raise PartitionError(f"deployment: cannot partition {len(labels)} samples into {n} nodes ({exc}){hint}") from None


@lru_cache(maxsize=16)
def _cached_shards(labels_bytes: bytes, deployment: str, n: int, alpha: float, seed: int, val_fraction: float):
    labels = np.frombuffer(labels_bytes, dtype=np.int64)
    shards = []
    for node, idx in enumerate(partition_indices(labels, deployment, n, alpha, seed)):
        if len(idx) < 2:
            raise PartitionError(f"deployment.num_nodes: node {node} gets {len(idx)} samples, too few to split train/validation")
        rng = np.random.default_rng([seed, node])
        perm = rng.permutation(idx)
        n_val = min(len(idx) - 1, max(1, int(round(val_fraction * len(idx)))))
        shards.append(NodeShard(node=node, train=np.sort(perm[n_val:]), val=np.sort(perm[:n_val])))
    return tuple(shards)


def node_shards(
    labels: np.ndarray, deployment: str, n: int, alpha: float, seed: int, val_fraction: float = 0.2
) -> tuple[NodeShard, ...]:
    """Every node's train/validation split (cached per process by content)."""
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    return _cached_shards(labels.tobytes(), deployment, n, float(alpha), int(seed), float(val_fraction))


def class_counts_table(counts: dict[int, list[int]], title: str = "samples per class") -> str:
    """A plain-text table: one row per node, one column per class, plus the total."""
    num_classes = max(len(c) for c in counts.values())
    head = ["node"] + [str(c) for c in range(num_classes)] + ["total"]
    rows = [[str(node)] + [str(v) for v in row] + [str(sum(row))] for node, row in sorted(counts.items())]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.rjust(w) for v, w in zip(r, widths))  # noqa: E731
    lines = [title, fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)
