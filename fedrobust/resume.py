"""Training in stages: a run trained to an epoch of its schedule, saved there, and resumed later.

A multi-fidelity study (:mod:`fedrobust.tuning.fidelity`) trains a trial to a
low budget, scores it, and promotes the best trials to higher budgets. A
promoted trial goes on from where it stopped, under the same schedule (the
learning rate's cosine runs over ``train.epochs`` whatever the stop), so no
epoch is trained twice and a trial promoted to the full budget ends with the
members a run trained in one go would have, bit for bit on CPU.

A :class:`TrainingStage` carries what the inline engine needs to go on: each
node's trainer states (weights, best weights, momentum, RNG, early-stopping
counters), the members' current weights (the peers a node is sent), their
histories, and a digest of the training config, so a stage is never resumed
under other settings. It is saved as plain tensors and lists
(``torch.load(weights_only=True)`` reads it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from omegaconf import DictConfig, OmegaConf

from .atomic import atomic_open
from .errors import ConfigError
from .training import EpochRecord

__all__ = ["CHECKPOINT", "TrainingStage", "load_stage", "save_stage", "training_digest"]

CHECKPOINT = "stage.pt"  # in a run directory trained to an epoch short of train.epochs

# the sections that decide what the members are; the attack, tuning and output keys do not
_TRAINING_SECTIONS = ("data", "deployment", "model", "strategy", "optimizer", "train")


def training_digest(cfg: DictConfig) -> str:
    """What must be equal for a stage to be resumed: the training sections, less the progress bar."""
    data = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in _TRAINING_SECTIONS if k in cfg}
    data["train"].pop("progress", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TrainingStage:
    """Train from epoch ``start`` (0: afresh) to epoch ``stop`` of the schedule.

    ``states`` (node -> trainer key -> state), ``current`` and ``history`` (member -> ...) are the run
    as it stood at ``start``; training fills them in as it stands at ``stop``.
    """

    stop: int
    start: int = 0
    states: dict[int, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)
    current: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    history: dict[int, list[EpochRecord]] = field(default_factory=dict)
    digest: str = ""

    def resumed_to(self, stop: int) -> TrainingStage:
        """The next stage: from this one's stop to ``stop``."""
        if stop <= self.stop:
            raise ValueError(f"a stage resumed at epoch {self.stop} must stop later, not at {stop}")
        return dataclasses.replace(self, start=self.stop, stop=stop)


def save_stage(path: Path, stage: TrainingStage) -> None:
    doc: dict[str, Any] = {
        "format": 1, "start": stage.start, "stop": stage.stop, "digest": stage.digest,
        "states": {str(n): s for n, s in stage.states.items()},
        "current": {str(m): w for m, w in stage.current.items()},
        "history": {str(m): [dataclasses.asdict(r) for r in h] for m, h in stage.history.items()},
    }
    with atomic_open(path, "wb") as f:
        torch.save(doc, f)


def load_stage(source: Path | IO[bytes], cfg: DictConfig) -> TrainingStage:
    """The stage saved at ``source`` (a path or a file object); a :class:`~fedrobust.errors.ConfigError` if
    ``cfg`` trains otherwise."""
    doc = torch.load(source, map_location="cpu", weights_only=True)
    digest = training_digest(cfg)
    if doc.get("format") != 1 or doc.get("digest") != digest:
        where = source if isinstance(source, (str, Path)) else "the checkpoint"
        raise ConfigError(f"{where}: saved under other training settings; it cannot be resumed with these")
    return TrainingStage(
        stop=int(doc["stop"]), start=int(doc["start"]), digest=digest,
        states={int(n): s for n, s in doc["states"].items()},
        current={int(m): w for m, w in doc["current"].items()},
        history={int(m): [EpochRecord(**r) for r in h] for m, h in doc["history"].items()},
    )
