"""What one node does in one round, with no transport.

:func:`train_node_round` loads the node's shard, trains (or resumes) every
member that lives on the node for this round's epochs, and returns one
:class:`MemberUpdate` per member. A member that diverged is reported with its
:class:`~fedrobust.training.Divergence` and without weights. The Flower ClientApp and the inline engine
are thin adapters around it, so both produce the same members.

It works from a :class:`~fedrobust.task.NodeTask`, what a node is sent. The
helpers here (and :func:`train_node_round`) also take a run config, which
they read through its task (:func:`fedrobust.task.node_task`).
"""

from __future__ import annotations

import socket
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from strategies import build_strategy

from .models.settings import model_spec
from .data import ImageDataset, load_dataset
from .models import build_model
from .partition import NodeShard, members_per_node, node_shards, num_nodes
from .behaviours import Behaviour
from .task import NodeTask, ShardSpec, node_task, shard_spec, train_settings
from .training import Divergence, EpochRecord, MemberTrainer, member_seed, resolve_device

__all__ = [
    "MemberUpdate",
    "build_member",
    "dataset_of_task",
    "host_identity",
    "initial_weights",
    "epochs_per_round",
    "members_of_node",
    "shards_for",
    "train_node_round",
    "train_settings",
]


@dataclass
class MemberUpdate:
    """One member as a node reports it after a round; a diverged member has ``divergence`` and no weights."""

    node: int
    member: int
    weights: dict[str, torch.Tensor] | None
    num_train_samples: int
    num_val_samples: int
    class_counts: list[int]
    best_epoch: int
    best_val_loss: float
    epochs_trained: int
    stopped: bool
    history: list[EpochRecord] = field(default_factory=list)
    current: dict[str, torch.Tensor] | None = None  # the member as it is now (sent to peers), when the strategy needs peers
    trained_on: dict[str, str] = field(default_factory=dict)  # host, and Ray node IP and id when in Ray
    divergence: Divergence | None = None  # set when its loss became non-finite: it never joins the ensemble


def host_identity() -> dict[str, str]:
    """Where this process runs: host name, plus the Ray node's IP and id inside a Ray worker."""
    ident = {"host": socket.gethostname()}
    ray = sys.modules.get("ray")  # a Ray worker or driver has imported it; importing it here costs 0.7 s
    if ray is None:
        return ident
    try:
        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
            ident |= {"node_ip": _ray_node_ip(node_id), "node_id": node_id}
    except Exception:  # Ray not usable here: the host name says enough
        pass
    return ident


@lru_cache(maxsize=8)
def _ray_node_ip(node_id: str) -> str:
    """The address the node joined the cluster with (several nodes may share a machine); asked once."""
    import ray

    ips = [n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id]
    return ips[0] if ips else ray.util.get_node_ip_address()


# What a node or a server knows of the run: its task, or the run's config.
RunSpec = NodeTask | DictConfig


def _shard_of(spec: RunSpec) -> ShardSpec:
    return spec.shard if isinstance(spec, NodeTask) else shard_spec(spec)


def members_of_node(spec: RunSpec, node: int) -> list[int]:
    """Global member indices trained on ``node``."""
    shard = _shard_of(spec)
    k = members_per_node(shard.deployment, shard.num_nodes)
    return list(range(node * k, (node + 1) * k))


def epochs_per_round(spec: RunSpec) -> list[int]:
    """Split the run's epochs over its rounds as evenly as possible."""
    epochs, rounds = (spec.train.epochs, spec.rounds) if isinstance(spec, NodeTask) else (spec.train.epochs, spec.train.rounds)
    q, r = divmod(epochs, rounds)
    return [q + (1 if i < r else 0) for i in range(rounds)]


def dataset_of_task(spec: RunSpec) -> ImageDataset:
    """The data set the run trains on (``shard.data``, ``shard.root``, ``shard.train_subset``)."""
    shard = _shard_of(spec)
    return load_dataset(shard.data, shard.root, shard.train_subset)


def build_member(spec: RunSpec, data: ImageDataset, seed: int | None = None) -> nn.Module:
    """A fresh member; with ``seed``, its initialisation is fixed without touching the global RNG."""
    model = spec.model if isinstance(spec, NodeTask) else model_spec(spec)
    if seed is None:
        return build_model(model, data.in_channels, data.num_classes, data.mean, data.std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(model, data.in_channels, data.num_classes, data.mean, data.std)


def shards_for(spec: RunSpec, data: ImageDataset) -> tuple[NodeShard, ...]:
    s = _shard_of(spec)
    return node_shards(data.y_train.numpy(), s.deployment, s.num_nodes, s.alpha, s.partition_seed, s.val_fraction,
                       s.server_images)


def initial_weights(spec: RunSpec, data: ImageDataset, members: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """Every member's initialisation, exactly as its node builds it (the server sends these as round-1 peers)."""
    seed = spec.seed if isinstance(spec, NodeTask) else spec.train.seed
    return {m: build_member(spec, data, member_seed(seed, m)).state_dict() for m in members}


def _sent(weights: dict[str, torch.Tensor], behaviour: Behaviour | None) -> dict[str, torch.Tensor]:
    """A member's weights as the node sends them (a cheating node's rewritten)."""
    return weights if behaviour is None else behaviour.poison_weights(weights)


def train_node_round(
    task: RunSpec,
    node: int,
    round_idx: int,
    state: MutableMapping[str, dict[str, torch.Tensor]],
    *,
    peers: dict[int, dict[str, torch.Tensor]] | None = None,
    device: torch.device | None = None,
    until: int | None = None,
    behaviour: Behaviour | None = None,
) -> list[MemberUpdate]:
    """Train ``node``'s members for round ``round_idx``; ``state`` carries trainers between rounds.

    With ``until``, training stops at that epoch of the schedule, also inside the round; a trainer
    resumed from ``state`` past the round's start trains only the rest of it (:mod:`fedrobust.resume`).

    ``task`` is what the node was sent (a run config is turned into it).
    ``peers`` holds the current weights of members on other nodes (used by
    strategies that need peers). Members that share a node train jointly
    under such a strategy, and independently otherwise.

    ``behaviour`` (simulation only: :mod:`fedrobust.behaviours`) makes the node cheat: it poisons the
    shard it trains on, skips training (its members are sent as initialised), or rewrites the members
    it sends.
    """
    if not isinstance(task, NodeTask):
        task = node_task(task)
    expected = num_nodes(task.shard.deployment, task.shard.num_nodes)
    if not 0 <= node < expected:
        raise ValueError(f"node {node} is outside this deployment's {expected} node(s)")
    device = device or resolve_device(task.device)
    data = dataset_of_task(task)
    shard = shards_for(task, data)[node]
    strategy = build_strategy(task.strategy, task.strategy_args)
    settings = task.train
    split = epochs_per_round(task)
    epochs = split[round_idx]
    round_start = sum(split[:round_idx])
    x_tr, y_tr = data.x_train[shard.train], data.y_train[shard.train]
    x_va, y_va = data.x_train[shard.val], data.y_train[shard.val]
    class_counts = np.bincount(y_tr.numpy(), minlength=data.num_classes).tolist()  # the shard's, as partitioned
    if behaviour is not None:
        seed = member_seed(task.seed, node)
        x_tr, y_tr = behaviour.poison_data(x_tr, y_tr, train=True, seed=seed)
        x_va, y_va = behaviour.poison_data(x_va, y_va, train=False, seed=seed)
    own = members_of_node(task, node)
    peer_models = []
    if strategy.needs_peers:
        for m, weights in sorted((peers or {}).items()):
            if m not in own:
                peer = build_member(task, data)
                peer.load_state_dict(weights)
                peer_models.append(peer)
    joint = strategy.needs_peers and len(own) > 1
    groups = [own] if joint else [[m] for m in own]
    updates = []
    for group in groups:
        seeds = [member_seed(task.seed, m) for m in group]
        models = [build_member(task, data, seed) for seed in seeds]
        trainer = MemberTrainer(models, x_tr, y_tr, x_va, y_va, strategy, settings, seeds[0], device)
        key = "joint" if joint else f"member-{group[0]}"
        if key in state:
            trainer.load_state_dict(state[key])
        todo = epochs
        if until is not None:  # up to the stop, from where the trainer stands (a resumed one: past the start)
            todo = max(0, min(round_start + epochs, until) - max(round_start, trainer.epoch))
        if behaviour is not None and not behaviour.trains:
            todo = 0  # a free rider: its members as initialised
        who = f"members {group[0]}-{group[-1]}" if joint else f"member {group[0]}"
        desc = f"node {node} {who} r{round_idx + 1}/{task.rounds}"
        history = trainer.run(todo, peers=peer_models, progress=task.progress, desc=desc)
        state[key] = trainer.state_dict()
        diverged = trainer.divergence is not None
        for k, m in enumerate(group):
            updates.append(
                MemberUpdate(
                    node=node,
                    member=m,
                    weights=None if diverged else _sent(trainer.best_weights(k), behaviour),
                    num_train_samples=len(shard.train),
                    num_val_samples=len(shard.val),
                    class_counts=class_counts,
                    best_epoch=trainer.best_epoch,
                    best_val_loss=trainer.best_val_loss,
                    epochs_trained=trainer.epoch,
                    stopped=trainer.stopped,
                    history=history,
                    current=(_sent(trainer.current_weights(k), behaviour) if strategy.needs_peers and not diverged
                             else None),
                    trained_on=host_identity(),
                    divergence=trainer.divergence,
                )
            )
    return updates
