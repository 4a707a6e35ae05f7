"""The ``data`` config section: which data set, where it lives, how it is split and augmented.

Its schema and checks, next to :mod:`fedrobust.data` that reads it; composed
into the whole config by :mod:`fedrobust.config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from .errors import check

__all__ = ["DATASETS", "DataConfig", "check_data"]

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100")


@dataclass
class DataConfig:
    name: str = "digits"  # digits | mnist | fashion_mnist | cifar10 | cifar100
    root: str | None = "data"  # null: the data set's standard install locations (mnist, fashion_mnist)
    train_subset: int | None = None  # keep this many training images (stratified, always the same); null: all
    augment: bool = False  # batched random crop (with padding) and horizontal flip
    crop_padding: int = 4  # pixels of padding for the random crop
    val_fraction: float = 0.2  # of each node's shard, never augmented


def check_data(cfg: DictConfig) -> None:
    d = cfg.data
    check(d.name in DATASETS, "data.name", f"unknown dataset '{d.name}' (choose from {', '.join(DATASETS)})")
    check(0.0 < d.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    if d.get("train_subset") is not None:
        check(d.train_subset >= 10, "data.train_subset", f"must be >= 10 or null, got {d.train_subset}")
    check(d.crop_padding >= 0, "data.crop_padding", f"must be >= 0, got {d.crop_padding}")
