"""The wire format between ServerApp and ClientApp: typed Flower records only.

Task (server → node): the :class:`~fedrobust.task.NodeTask` and the round, as
``ConfigRecord``s, never the run's config:

* ``task``: ``version`` (1), ``round`` (0-based), ``num-rounds``, ``model``
  (a name, or ``searched:`` and the genotype's JSON, never a path), ``seed``,
  ``device``, ``threads``, ``progress``, ``strategy`` (its name) and, when
  some field is null, ``null`` (their names, e.g. ``shard.root``);
* ``task.train``: the :class:`~fedrobust.training.TrainSettings` fields;
* ``task.shard``: the :class:`~fedrobust.task.ShardSpec` fields;
* ``task.strategy``: the strategy's arguments.

A null field is left out of its record and named in ``task["null"]``.
:func:`decode_task` rejects a record or field it does not know, a missing
one, a wrong type or range, an unknown model, data set or strategy, with a
one-line :class:`~fedrobust.task.TaskError`.

Task entries ``peer.j`` (``ArrayRecord``) carry the current weights of the
members on other nodes, for strategies that need peers.

Reply (node → server), per member ``m`` trained on the node:
``weights.m`` (``ArrayRecord`` of the best checkpoint), ``current.m`` (the
member as it is now, for its peers, when the strategy needs peers) and ``metrics.m``
(``MetricRecord``: node, member, sample counts, class counts, early-stopping
state and the per-epoch history as lists) and ``where.m`` (``ConfigRecord``:
the host, and the Ray node's IP and id, that trained it). A member that
diverged sends ``diverged.m`` (``ConfigRecord``: epoch, which loss, its
non-finite value as text, and the last finite loss) in place of
``weights.m`` and ``current.m``: its weights never cross the wire.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from omegaconf import DictConfig

from .errors import one_line
from .ensemble import InvalidUpdateError
from .node import MemberUpdate
from .task import NodeTask, ShardSpec, TaskError, check_task, node_task
from .training import Divergence, EpochRecord, TrainSettings

__all__ = ["TASK_VERSION", "decode_reply", "decode_task", "encode_reply", "encode_task"]

_HISTORY = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc")

TASK_VERSION = 2  # 2: shard.server_images
_TOP = ("version", "round", "num-rounds", "model", "seed", "device", "threads", "progress", "strategy")
_TRAIN = tuple(f.name for f in dataclasses.fields(TrainSettings))
_SHARD = tuple(f.name for f in dataclasses.fields(ShardSpec))
_NULLABLE_SHARD = ("root", "train_subset")
_TASK_RECORDS = ("task", "task.train", "task.shard", "task.strategy")


def _record(values: dict, section: str, nulls: list[str]) -> ConfigRecord:
    kept = {}
    for key, value in values.items():
        if value is None:
            nulls.append(f"{section}.{key}")
        else:
            kept[key] = value
    try:
        return ConfigRecord(kept)
    except (TypeError, ValueError) as exc:
        raise TaskError(f"malformed task: {section}: {one_line(exc)}") from None


def encode_task(task: NodeTask | DictConfig, round_idx: int, peers: dict[int, dict] | None = None) -> RecordDict:
    """The records of ``task`` for round ``round_idx`` (a run config is turned into its task first)."""
    if isinstance(task, DictConfig):
        task = node_task(task)
    check_task(task)
    nulls: list[str] = []
    train = _record(dataclasses.asdict(task.train), "train", nulls)
    shard = _record(dataclasses.asdict(task.shard), "shard", nulls)
    strategy = _record(dict(task.strategy_args), "strategy", nulls)
    top = {"version": TASK_VERSION, "round": int(round_idx), "num-rounds": task.rounds, "model": task.model,
           "seed": task.seed, "device": task.device, "threads": task.threads, "progress": task.progress,
           "strategy": task.strategy}
    if nulls:
        top["null"] = nulls
    rd = RecordDict({"task": ConfigRecord(top), "task.train": train, "task.shard": shard, "task.strategy": strategy})
    for m, weights in (peers or {}).items():
        rd[f"peer.{m}"] = ArrayRecord(weights)
    return rd


def _fields(record: ConfigRecord, name: str, known: tuple[str, ...] | None, nullable: tuple[str, ...],
            nulls: set[str]) -> dict:
    """A record's values, with its null fields; ``known`` None: any key (a strategy's arguments)."""
    section = name.split(".", 1)[1]
    values = dict(record.items())
    for key in values:
        if known is not None and key not in known:
            raise TaskError(f"malformed task: {name}.{key}: unknown field")
    for full in nulls:
        sec, _, key = full.partition(".")
        if sec != section:
            continue
        if key in values or (known is not None and key not in nullable):
            raise TaskError(f"malformed task: task.null: '{full}' cannot be null")
        values[key] = None
    for key in known or ():
        if key not in values:
            raise TaskError(f"malformed task: {name}.{key}: missing")
    return values


def decode_task(content: RecordDict) -> tuple[NodeTask, int, dict[int, dict]]:
    """The task, the round and the peers' weights in a task message; :class:`TaskError` if malformed."""
    try:
        configs = content.config_records
        for key in content.keys():
            if key not in _TASK_RECORDS and not key.startswith("peer."):
                raise TaskError(f"malformed task: {key}: unknown record")
        for key in _TASK_RECORDS:
            if key not in configs:
                raise TaskError(f"malformed task: {key}: missing record")
        top = dict(configs["task"].items())
        for key in top:
            if key not in (*_TOP, "null"):
                raise TaskError(f"malformed task: task.{key}: unknown field")
        for key in _TOP:
            if key not in top:
                raise TaskError(f"malformed task: task.{key}: missing")
        if top["version"] != TASK_VERSION:
            raise TaskError(f"malformed task: task.version: this node reads version {TASK_VERSION}, "
                            f"got {str(top['version'])[:20]} (server and node run different fedrobust versions)")
        nulls = top.get("null", [])
        if not isinstance(nulls, list) or not all(isinstance(n, str) for n in nulls):
            raise TaskError("malformed task: task.null: expected a list of field names")
        nulls = set(nulls)
        unknown = sorted(n for n in nulls if n.partition(".")[0] not in ("train", "shard", "strategy"))
        if unknown:
            raise TaskError(f"malformed task: task.null: '{unknown[0][:60]}' cannot be null")
        train = _fields(configs["task.train"], "task.train", _TRAIN, (), nulls)
        shard = _fields(configs["task.shard"], "task.shard", _SHARD, _NULLABLE_SHARD, nulls)
        args = _fields(configs["task.strategy"], "task.strategy", None, (), nulls)
        task = NodeTask(model=top["model"], train=TrainSettings(**train), strategy=top["strategy"], strategy_args=args,
                        shard=ShardSpec(**shard), seed=top["seed"], rounds=top["num-rounds"], device=top["device"],
                        threads=top["threads"], progress=top["progress"])
        check_task(task)
        round_idx = top["round"]
        if isinstance(round_idx, bool) or not isinstance(round_idx, int) or not 0 <= round_idx < task.rounds:
            raise TaskError(f"malformed task: task.round: must be an int in [0, {task.rounds}), got {str(round_idx)[:20]}")
        # float fields as floats, whatever number type the wire gave, so that both engines compute alike
        task = dataclasses.replace(
            task,
            train=dataclasses.replace(task.train, **{k: float(getattr(task.train, k))
                                                     for k in ("lr", "momentum", "weight_decay")}),
            shard=dataclasses.replace(task.shard, val_fraction=float(task.shard.val_fraction),
                                      alpha=float(task.shard.alpha)),
        )
        peers = {}
        for key, rec in content.array_records.items():
            member = key.split(".", 1)[1]
            if not member.isdigit():
                raise TaskError(f"malformed task: {key[:60]}: expected peer.<member index>")
            peers[int(member)] = rec.to_torch_state_dict()
    except TaskError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TaskError(f"malformed task: {type(exc).__name__}: {one_line(exc)[:200]}") from None
    return task, round_idx, peers


def encode_reply(updates: list[MemberUpdate]) -> RecordDict:
    rd = RecordDict()
    for u in updates:
        if u.divergence is not None:
            d = u.divergence
            rd[f"diverged.{u.member}"] = ConfigRecord(
                {"epoch": d.epoch, "loss": d.loss, "value": str(d.value)}
                | ({} if d.last_finite_loss is None else {"last_finite_loss": float(d.last_finite_loss)})
            )
        else:
            rd[f"weights.{u.member}"] = ArrayRecord(u.weights)
            if u.current is not None:
                rd[f"current.{u.member}"] = ArrayRecord(u.current)
        metrics: dict = {
            "node": u.node,
            "member": u.member,
            "num_train_samples": u.num_train_samples,
            "num_val_samples": u.num_val_samples,
            "class_counts": [int(c) for c in u.class_counts],
            "best_epoch": u.best_epoch,
            "best_val_loss": float(u.best_val_loss) if np.isfinite(u.best_val_loss) else -1.0,
            "epochs_trained": u.epochs_trained,
            "stopped": int(u.stopped),
        }
        for name in _HISTORY:
            values = [getattr(r, name) for r in u.history]
            metrics[f"history.{name}"] = [int(v) for v in values] if name == "epoch" else [float(v) for v in values]
        for term in sorted({t for r in u.history for t in r.terms}):
            metrics[f"history.term.{term}"] = [float(r.terms.get(term, float("nan"))) for r in u.history]
        rd[f"metrics.{u.member}"] = MetricRecord(metrics)
        if u.trained_on:
            rd[f"where.{u.member}"] = ConfigRecord({k: str(v) for k, v in u.trained_on.items()})
    return rd


def decode_reply(content: RecordDict, who: str) -> list[MemberUpdate]:
    """Members in a reply, with weights as numpy arrays (validated later against the model)."""
    try:
        members = sorted(int(k.split(".", 1)[1]) for k in content.keys() if k.startswith("metrics."))
        if not members:
            raise InvalidUpdateError(f"{who}: rejected reply, it carries no member")
        updates = []
        for m in members:
            metrics = content.metric_records[f"metrics.{m}"]
            where = content.config_records.get(f"where.{m}")
            diverged = content.config_records.get(f"diverged.{m}")
            divergence, weights, current = None, None, None
            if diverged is not None:  # no weights are read from a diverged member, whatever else it sent
                last = diverged.get("last_finite_loss")
                if diverged["loss"] not in ("train", "validation"):
                    raise ValueError(f"diverged.{m}: unknown loss {str(diverged['loss'])[:40]!r}")
                divergence = Divergence(int(diverged["epoch"]), str(diverged["loss"]), float(str(diverged["value"])),
                                        None if last is None else float(last))
            else:
                arrays = content.array_records[f"weights.{m}"]
                weights = {name: arr.numpy() for name, arr in arrays.items()}
                current = content.array_records.get(f"current.{m}")
                current = {name: arr.numpy() for name, arr in current.items()} if current is not None else None
            n = len(metrics["history.epoch"])
            terms = {k[len("history.term.") :]: metrics[k] for k in metrics if k.startswith("history.term.")}
            history = [
                EpochRecord(
                    epoch=int(metrics["history.epoch"][i]),
                    lr=float(metrics["history.lr"][i]),
                    train_loss=float(metrics["history.train_loss"][i]),
                    train_acc=float(metrics["history.train_acc"][i]),
                    val_loss=float(metrics["history.val_loss"][i]),
                    val_acc=float(metrics["history.val_acc"][i]),
                    terms={t: float(v[i]) for t, v in terms.items()},
                )
                for i in range(n)
            ]
            updates.append(
                MemberUpdate(
                    node=int(metrics["node"]),
                    member=int(metrics["member"]),
                    weights=weights,
                    num_train_samples=int(metrics["num_train_samples"]),
                    num_val_samples=int(metrics["num_val_samples"]),
                    class_counts=[int(c) for c in metrics["class_counts"]],
                    best_epoch=int(metrics["best_epoch"]),
                    best_val_loss=float(metrics["best_val_loss"]),
                    epochs_trained=int(metrics["epochs_trained"]),
                    stopped=bool(metrics["stopped"]),
                    history=history,
                    current=current,
                    trained_on={str(k): str(v) for k, v in where.items()} if where is not None else {},
                    divergence=divergence,
                )
            )
        return updates
    except InvalidUpdateError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise InvalidUpdateError(f"{who}: rejected reply, malformed content ({type(exc).__name__}: {exc})") from None
