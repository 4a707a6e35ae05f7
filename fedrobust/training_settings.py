"""The ``optimizer`` and ``train`` config sections: how each member is trained.

Their schemas and checks, next to :mod:`fedrobust.training` that reads them;
composed into the whole config by :mod:`fedrobust.config`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from omegaconf import DictConfig

from .errors import check

__all__ = ["PRECISIONS", "OptimizerConfig", "TrainConfig", "check_optimizer", "check_train"]

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class OptimizerConfig:
    lr: float = 0.1  # SGD learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 weight decay


@dataclass
class TrainConfig:
    epochs: int = 40  # total local epochs, split evenly over the rounds
    rounds: int | None = None  # None: 1, or 10 (at most epochs) when the strategy exchanges peers
    batch_size: int = 128  # training batch size
    patience: int = 10  # early stopping on validation loss
    seed: int = 0  # the run's seed: each member's initialisation and batch order derive from it and its index
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast for training (fp16 with a grad scaler); attacks stay fp32
    progress: bool = True  # progress bars on a terminal


def check_optimizer(cfg: DictConfig) -> None:
    o = cfg.optimizer
    check(0 < o.lr < math.inf, "optimizer.lr", f"must be > 0 and finite, got {o.lr}")
    check(0.0 <= o.momentum < 1.0, "optimizer.momentum", f"must be in [0, 1), got {o.momentum}")
    check(o.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {o.weight_decay}")


def check_train(cfg: DictConfig) -> None:
    t = cfg.train
    check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    check(t.rounds >= 1, "train.rounds", f"must be >= 1, got {t.rounds}")
    check(t.rounds <= t.epochs, "train.rounds", f"must be <= train.epochs ({t.epochs}), got {t.rounds}")
    check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    check(t.patience >= 1, "train.patience", f"must be >= 1, got {t.patience}")
    check(t.seed >= 0, "train.seed", f"must be >= 0, got {t.seed}")
    check(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device) is not None, "train.device",
          f"must be auto, cpu, cuda, cuda:N or mps, got '{t.device}'")
    check(t.precision in PRECISIONS, "train.precision",
          f"unknown value '{t.precision}' (choose from {', '.join(PRECISIONS)})")
