"""The wire format between ServerApp and ClientApp: typed Flower records only.

Task (server → node), in ``RecordDict["task"]`` (a ``ConfigRecord``):
``config`` (the resolved run config as JSON), ``round`` and ``num-rounds``.

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

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from omegaconf import DictConfig

from .config import config_from_json, config_to_json
from .ensemble import InvalidUpdateError
from .node import MemberUpdate
from .training import Divergence, EpochRecord

__all__ = ["decode_reply", "decode_task", "encode_reply", "encode_task"]

_HISTORY = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc")


def encode_task(cfg: DictConfig, round_idx: int, peers: dict[int, dict] | None = None) -> RecordDict:
    rd = RecordDict(
        {"task": ConfigRecord({"config": config_to_json(cfg), "round": round_idx, "num-rounds": cfg.train.rounds})}
    )
    for m, weights in (peers or {}).items():
        rd[f"peer.{m}"] = ArrayRecord(weights)
    return rd


def decode_task(content: RecordDict) -> tuple[DictConfig, int, dict[int, dict]]:
    task = content["task"]
    cfg = config_from_json(str(task["config"]))
    peers = {
        int(k.split(".", 1)[1]): rec.to_torch_state_dict()
        for k, rec in content.array_records.items()
        if k.startswith("peer.")
    }
    return cfg, int(task["round"]), peers


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
