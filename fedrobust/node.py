"""What one node does in one round, with no transport.

:func:`train_node_round` loads the node's shard, trains (or resumes) every
member that lives on the node for this round's epochs, and returns one
:class:`MemberUpdate` per member. The Flower ClientApp and the inline engine
are thin adapters around it, so both produce the same members.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from strategies import build_strategy

from .data import ImageDataset, load_dataset
from .models import build_model
from .partition import NodeShard, members_per_node, node_shards, num_nodes
from .training import EpochRecord, MemberTrainer, TrainSettings, member_seed, resolve_device

__all__ = [
    "MemberUpdate",
    "build_member",
    "epochs_per_round",
    "members_of_node",
    "shards_for",
    "train_node_round",
    "train_settings",
]


@dataclass
class MemberUpdate:
    """One member as a node reports it after a round."""

    node: int
    member: int
    weights: dict[str, torch.Tensor]
    num_train_samples: int
    num_val_samples: int
    class_counts: list[int]
    best_epoch: int
    best_val_loss: float
    epochs_trained: int
    stopped: bool
    history: list[EpochRecord] = field(default_factory=list)


def members_of_node(cfg: DictConfig, node: int) -> list[int]:
    """Global member indices trained on ``node``."""
    k = members_per_node(cfg.deployment.name, cfg.deployment.num_nodes)
    return list(range(node * k, (node + 1) * k))


def epochs_per_round(cfg: DictConfig) -> list[int]:
    """Split ``train.epochs`` over ``train.rounds`` as evenly as possible."""
    q, r = divmod(cfg.train.epochs, cfg.train.rounds)
    return [q + (1 if i < r else 0) for i in range(cfg.train.rounds)]


def train_settings(cfg: DictConfig) -> TrainSettings:
    return TrainSettings(
        lr=cfg.optimizer.lr,
        momentum=cfg.optimizer.momentum,
        weight_decay=cfg.optimizer.weight_decay,
        epochs=cfg.train.epochs,
        batch_size=cfg.train.batch_size,
        patience=cfg.train.patience,
        augment=cfg.data.augment,
        crop_padding=cfg.data.crop_padding,
    )


def build_member(cfg: DictConfig, data: ImageDataset, seed: int | None = None) -> nn.Module:
    """A fresh member; with ``seed``, its initialisation is fixed without touching the global RNG."""
    if seed is None:
        return build_model(cfg.model.name, data.in_channels, data.num_classes, data.mean, data.std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(cfg.model.name, data.in_channels, data.num_classes, data.mean, data.std)


def shards_for(cfg: DictConfig, data: ImageDataset) -> tuple[NodeShard, ...]:
    d = cfg.deployment
    return node_shards(data.y_train.numpy(), d.name, d.num_nodes, d.alpha, d.partition_seed, cfg.data.val_fraction)


def train_node_round(
    cfg: DictConfig,
    node: int,
    round_idx: int,
    state: MutableMapping[str, dict[str, torch.Tensor]],
    *,
    device: torch.device | None = None,
) -> list[MemberUpdate]:
    """Train ``node``'s members for round ``round_idx``; ``state`` carries trainers between rounds."""
    expected = num_nodes(cfg.deployment.name, cfg.deployment.num_nodes)
    if not 0 <= node < expected:
        raise ValueError(f"node {node} is outside this deployment's {expected} node(s)")
    device = device or resolve_device(cfg.train.device)
    data = load_dataset(cfg.data.name, cfg.data.root)
    shard = shards_for(cfg, data)[node]
    strategy = build_strategy(cfg.strategy)
    settings = train_settings(cfg)
    epochs = epochs_per_round(cfg)[round_idx]
    x_tr, y_tr = data.x_train[shard.train], data.y_train[shard.train]
    x_va, y_va = data.x_train[shard.val], data.y_train[shard.val]
    class_counts = np.bincount(y_tr.numpy(), minlength=data.num_classes).tolist()
    updates = []
    for m in members_of_node(cfg, node):
        seed = member_seed(cfg.train.seed, m)
        model = build_member(cfg, data, seed)
        trainer = MemberTrainer(model, x_tr, y_tr, x_va, y_va, strategy, settings, seed, device)
        key = f"member-{m}"
        if key in state:
            trainer.load_state_dict(state[key])
        desc = f"node {node} member {m} r{round_idx + 1}/{cfg.train.rounds}"
        history = trainer.run(epochs, progress=cfg.train.progress, desc=desc)
        state[key] = trainer.state_dict()
        updates.append(
            MemberUpdate(
                node=node,
                member=m,
                weights=trainer.best_weights(),
                num_train_samples=len(shard.train),
                num_val_samples=len(shard.val),
                class_counts=class_counts,
                best_epoch=trainer.best_epoch,
                best_val_loss=trainer.best_val_loss,
                epochs_trained=trainer.epoch,
                stopped=trainer.stopped,
                history=history,
            )
        )
    return updates
