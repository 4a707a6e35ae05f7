"""What a node is sent: a small typed task, not the run's config.

A :class:`NodeTask` holds what :func:`fedrobust.node.train_node_round` reads
and nothing else: the model, the :class:`~fedrobust.training.TrainSettings`,
the strategy's name and arguments, the shard (:class:`ShardSpec`: the data
set and the deployment's partitioning of it), the run's seed and number of
rounds, the device, the torch threads and whether to show progress. The
server builds it with :func:`node_task`; the attack and tune sections, run
directories and storage URLs never reach a node.

:func:`check_task` is the node's validation: types, ranges, known model (or a
searched model's genotype, which travels as JSON and is checked field by field),
data set, deployment and strategy names (plug-ins included once loaded), the
strategy's arguments against its schema. A malformed task raises
:class:`TaskError`, whose message is one line naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from strategies.settings import STRATEGY_SCHEMAS, check_strategy_keys, strategy_names

from .data_settings import DATASETS
from .deployment_settings import DEPLOYMENTS
from .errors import ConfigError, one_line
from .models.settings import MODELS, SEARCHED_PREFIX, is_searched, model_spec
from .training import TrainSettings

__all__ = ["NodeTask", "ShardSpec", "TaskError", "check_task", "node_task", "shard_spec", "train_settings"]


class TaskError(ValueError):
    """A node task that cannot run; the message is one line naming the field."""


@dataclass(frozen=True)
class ShardSpec:
    """The data a node trains on: the data set, and the deployment's partitioning of its training split."""

    data: str  # data set name
    root: str | None  # where its files are (None: its standard install locations); a node may override it
    train_subset: int | None  # the stratified subset of the training split every run draws alike; None: all
    val_fraction: float  # of each shard, for early stopping
    deployment: str
    num_nodes: int
    alpha: float  # Dirichlet concentration (distributed_dirichlet)
    partition_seed: int
    server_images: int = 0  # training images the server keeps (drawn first; no node gets them)


@dataclass(frozen=True)
class NodeTask:
    """Everything a node needs to train its members for any round of a run."""

    model: str  # a hand-made model's name, or searched: and the genotype's JSON (never a path: a node reads no file)
    train: TrainSettings
    strategy: str
    strategy_args: Mapping[str, Any]  # the strategy's constructor arguments: scalars, or lists of them
    shard: ShardSpec
    seed: int  # train.seed: each member's seed is derived from it and the member's index
    rounds: int
    device: str = "auto"
    threads: int = 1  # torch threads on the node
    progress: bool = True

    def with_data_root(self, root: str | None) -> NodeTask:
        """The same task with the node's own data folder."""
        return dataclasses.replace(self, shard=dataclasses.replace(self.shard, root=root))


def train_settings(cfg: DictConfig) -> TrainSettings:
    """A run config's member-training settings."""
    return TrainSettings(
        lr=float(cfg.optimizer.lr),
        momentum=float(cfg.optimizer.momentum),
        weight_decay=float(cfg.optimizer.weight_decay),
        epochs=int(cfg.train.epochs),
        batch_size=int(cfg.train.batch_size),
        patience=int(cfg.train.patience),
        augment=bool(cfg.data.augment),
        crop_padding=int(cfg.data.crop_padding),
        precision=str(cfg.train.precision),
    )


def shard_spec(cfg: DictConfig) -> ShardSpec:
    """A run config's data set and partitioning."""
    d, p = cfg.data, cfg.deployment
    subset = d.get("train_subset")
    return ShardSpec(data=str(d.name), root=None if d.root is None else str(d.root),
                     train_subset=None if subset is None else int(subset), val_fraction=float(d.val_fraction),
                     deployment=str(p.name), num_nodes=int(p.num_nodes), alpha=float(p.alpha),
                     partition_seed=int(p.partition_seed), server_images=int(p.server_images))


def node_task(cfg: DictConfig) -> NodeTask:
    """The task every node of the run described by ``cfg`` receives (checked with :func:`check_task`)."""
    args = OmegaConf.to_container(cfg.strategy, resolve=True)
    args.pop("name", None)
    task = NodeTask(model=model_spec(cfg), train=train_settings(cfg), strategy=str(cfg.strategy.name),
                    strategy_args=args, shard=shard_spec(cfg), seed=int(cfg.train.seed), rounds=int(cfg.train.rounds),
                    device=str(cfg.train.device), threads=max(1, int(cfg.engine.num_cpus)),
                    progress=bool(cfg.train.progress))
    check_task(task)
    return task


# ------------------------------------------------------------------ checks --

def _fail(key: str, msg: str) -> None:
    raise TaskError(f"malformed task: {key}: {msg}")


def _need(ok: bool, key: str, msg: str) -> None:
    if not ok:
        _fail(key, msg)


def _typed(value: Any, kind: type, key: str, nullable: bool = False) -> None:
    if value is None and nullable:
        return
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    _need(ok, key, f"expected {kind.__name__}{' or null' if nullable else ''}, got {type(value).__name__} {value!r:.60}")


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    _need(value in allowed, key, f"unknown value '{value:.60}' (choose from {', '.join(allowed)})")


_TRAIN_TYPES = {"lr": float, "momentum": float, "weight_decay": float, "epochs": int, "batch_size": int,
                "patience": int, "augment": bool, "crop_padding": int, "precision": str}
_SHARD_TYPES = {"data": (str, False), "root": (str, True), "train_subset": (int, True), "val_fraction": (float, False),
                "deployment": (str, False), "num_nodes": (int, False), "alpha": (float, False),
                "partition_seed": (int, False), "server_images": (int, False)}
_ARG_TYPES = (bool, int, float, str)


def _check_genotype(text: str) -> None:
    """A searched model's genotype, as JSON in the task: checked as a genotype file is (size, depth, fields)."""
    from .nas import GenotypeError, parse_genotype

    _need(text.lstrip().startswith("{"), "model", f"a searched model travels as its genotype's JSON "
          f"(searched:{{...}}), not as a file name, got 'searched:{text:.60}'")
    try:
        parse_genotype(text)
    except GenotypeError as exc:
        _fail("model", f"searched genotype: {one_line(exc)}")


def check_task(task: NodeTask) -> None:
    """Check what a node uses of ``task``: types, ranges and names. Raises :class:`TaskError`."""
    _typed(task.model, str, "model")
    if is_searched(task.model):
        _check_genotype(task.model[len(SEARCHED_PREFIX):])
    else:
        _one_of(task.model, MODELS, "model")
    _typed(task.seed, int, "seed")
    _need(task.seed >= 0, "seed", f"must be >= 0, got {task.seed}")
    _typed(task.rounds, int, "num-rounds")
    _typed(task.device, str, "device")
    _need(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", task.device) is not None, "device",
          f"must be auto, cpu, cuda, cuda:N or mps, got '{task.device:.60}'")
    _typed(task.threads, int, "threads")
    _need(task.threads >= 1, "threads", f"must be >= 1, got {task.threads}")
    _typed(task.progress, bool, "progress")

    t = task.train
    _need(isinstance(t, TrainSettings), "train", "expected TrainSettings")
    for name, kind in _TRAIN_TYPES.items():
        _typed(getattr(t, name), kind, f"train.{name}")
    _need(0 < t.lr < math.inf, "train.lr", f"must be > 0 and finite, got {t.lr}")
    _need(0.0 <= t.momentum < 1.0, "train.momentum", f"must be in [0, 1), got {t.momentum}")
    _need(0 <= t.weight_decay < math.inf, "train.weight_decay", f"must be >= 0 and finite, got {t.weight_decay}")
    _need(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _need(1 <= task.rounds <= t.epochs, "num-rounds", f"must be in [1, train.epochs={t.epochs}], got {task.rounds}")
    _need(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _need(t.patience >= 1, "train.patience", f"must be >= 1, got {t.patience}")
    _need(t.crop_padding >= 0, "train.crop_padding", f"must be >= 0, got {t.crop_padding}")
    _one_of(t.precision, ("fp32", "bf16", "fp16"), "train.precision")

    s = task.shard
    _need(isinstance(s, ShardSpec), "shard", "expected ShardSpec")
    for name, (kind, nullable) in _SHARD_TYPES.items():
        _typed(getattr(s, name), kind, f"shard.{name}", nullable)
    _one_of(s.data, DATASETS, "shard.data")
    _need(s.train_subset is None or s.train_subset >= 10, "shard.train_subset", f"must be >= 10 or null, got {s.train_subset}")
    _need(0.0 < s.val_fraction < 1.0, "shard.val_fraction", f"must be in (0, 1), got {s.val_fraction}")
    _one_of(s.deployment, DEPLOYMENTS, "shard.deployment")
    _need(s.num_nodes >= 1, "shard.num_nodes", f"must be >= 1, got {s.num_nodes}")
    _need(0 < s.alpha < math.inf, "shard.alpha", f"must be > 0 and finite, got {s.alpha}")
    _need(s.partition_seed >= 0, "shard.partition_seed", f"must be >= 0, got {s.partition_seed}")
    _need(s.server_images >= 0, "shard.server_images", f"must be >= 0, got {s.server_images}")

    _typed(task.strategy, str, "strategy")
    _need(task.strategy in STRATEGY_SCHEMAS, "strategy", f"unknown strategy '{task.strategy:.60}' (choose from "
          f"{', '.join(strategy_names())}; a plug-in strategy's package must be installed on the node)")
    args = task.strategy_args
    _need(isinstance(args, Mapping), "strategy_args", "expected a mapping")
    for key, value in args.items():
        scalar = value is None or isinstance(value, _ARG_TYPES)
        listed = isinstance(value, list) and all(isinstance(v, _ARG_TYPES) for v in value)
        _need(isinstance(key, str) and key != "name" and (scalar or listed), f"strategy.{key}",
              "a strategy argument is a number, a string, a bool, null or a list of them")
    try:  # the strategy's own schema: no unknown key, every value of its type
        typed = OmegaConf.merge(OmegaConf.structured(STRATEGY_SCHEMAS[task.strategy]), {"name": task.strategy, **args})
        check_strategy_keys(typed, "strategy")
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        _fail(f"strategy.{key}" if key else "strategy", one_line(str(exc).splitlines()[0]))
    except ConfigError as exc:
        raise TaskError(f"malformed task: {exc}") from None
