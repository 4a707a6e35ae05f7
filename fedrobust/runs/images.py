"""The held-out images a run is scored on: the test set, or the union of the nodes' validation splits.

Every figure of a run is measured on an :class:`Images`: a split, indices
into it and how they were drawn. Training's clean accuracy, an evaluation,
a loss search's fitness and held-out tables, and a study's selection all
draw them here, so that they agree on which images are which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ..data import ImageDataset

__all__ = ["Images", "evaluation_images", "evaluation_sample", "held_out_images", "validation_indices"]


def evaluation_sample(num_test: int, num_samples: int, seed: int) -> np.ndarray:
    """Fixed test indices: ``num_samples`` drawn without replacement (all of them if fewer), sorted."""
    if num_samples >= num_test:
        return np.arange(num_test)
    return np.sort(np.random.default_rng(seed).choice(num_test, size=num_samples, replace=False))


def validation_indices(cfg: DictConfig, data: ImageDataset) -> np.ndarray:
    """The union of the nodes' validation splits: sorted indices into the training set."""
    from ..node import shards_for

    return np.unique(np.concatenate([np.asarray(s.val, dtype=np.int64) for s in shards_for(cfg, data)]))


_POOLS = {"test": "the test set", "validation": "the union of the nodes' validation splits"}


@dataclass(frozen=True)
class Images:
    """Held-out images a figure is measured on: the split, the indices into it, how they were drawn.

    ``indices`` index the test set (split ``test``) or the training set (split ``validation``).
    """

    split: str
    indices: np.ndarray
    pool: int  # how many images the split holds
    seed: int | None = None  # None: the whole split

    def tensors(self, data: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """The images (as stored) and their labels."""
        idx = torch.as_tensor(self.indices)
        if self.split == "test":
            return data.x_test[idx], data.y_test[idx]
        return data.x_train[idx], data.y_train[idx]

    def describe(self) -> dict[str, Any]:
        """What ``results.json`` records: the split, how many images, and how they were drawn."""
        n = len(self.indices)
        if self.seed is None or n == self.pool:
            text = f"{self.split}: all {n} images of {_POOLS[self.split]}"
        else:
            text = f"{self.split}: {n} images drawn with seed {self.seed} from {_POOLS[self.split]} ({self.pool} images)"
        return {"split": self.split, "num_images": n, "drawn_from": self.pool, "seed": self.seed, "text": text}


def held_out_images(cfg: DictConfig, data: ImageDataset, split: str | None = None) -> Images:
    """All the images of ``split`` (default ``attack.split``): the test set, or the nodes' validation splits."""
    split = split or cfg.attack.split
    if split == "test":
        return Images("test", np.arange(len(data.y_test)), len(data.y_test))
    idx = validation_indices(cfg, data)
    return Images("validation", idx, len(idx))


def evaluation_images(cfg: DictConfig, data: ImageDataset) -> Images:
    """The evaluation sample: ``attack.num_samples`` images of ``attack.split``, drawn with ``attack.sample_seed``."""
    a = cfg.attack
    whole = held_out_images(cfg, data)
    pick = evaluation_sample(whole.pool, a.num_samples, a.sample_seed)
    return Images(whole.split, whole.indices[pick], whole.pool, a.sample_seed)
