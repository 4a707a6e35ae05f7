"""Member training: one transport-free function and the resumable trainer behind it.

:func:`train_member` trains one member on tensors it is given: SGD with
momentum and weight decay, cosine annealing over the total epochs, early
stopping on validation loss, and the best-validation checkpoint kept. It knows
nothing of Flower; the ClientApp and the inline engine both call it through
:func:`fedrobust.node.train_node_round`.

:class:`MemberTrainer` holds the state that must survive between rounds of a
multi-round protocol (weights, best checkpoint, momentum buffers, the batching
RNG, the early-stopping counters). Its ``state_dict`` is a flat dict of
tensors, so it can be stored in a Flower ``Context`` between rounds, and
restoring it continues training bit for bit.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from strategies import TrainingStrategy

from .augment import random_crop_flip
from .data import to_float
from .progress import progress as progress_bar

__all__ = [
    "EpochRecord",
    "MemberTrainer",
    "TrainSettings",
    "cosine_lr",
    "evaluate_model",
    "member_seed",
    "resolve_device",
    "train_member",
]


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={spec} but CUDA is not available on this machine")
    return device


def member_seed(train_seed: int, member: int) -> int:
    """Independent seed for member ``member`` of a run seeded ``train_seed``."""
    return int(np.random.SeedSequence([train_seed, member]).generate_state(1)[0])


def cosine_lr(base_lr: float, epoch: int, total_epochs: int) -> float:
    """Cosine annealing to zero over ``total_epochs`` (per-epoch steps, as CosineAnnealingLR)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / total_epochs))


@dataclass(frozen=True)
class TrainSettings:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 40
    batch_size: int = 128
    patience: int = 10
    augment: bool = False
    crop_padding: int = 4


@dataclass
class EpochRecord:
    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    terms: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) on ``(x, y)``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, correct = 0.0, 0
    for i in range(0, len(x), batch_size):
        xb = to_float(x[i : i + batch_size].to(device))
        yb = y[i : i + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    n = max(len(x), 1)
    return loss_sum / n, correct / n


class MemberTrainer:
    """Trains one member; call :meth:`run` once, or once per round."""

    def __init__(
        self,
        model: nn.Module,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        strategy: TrainingStrategy,
        settings: TrainSettings,
        seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.x_train, self.y_train = x_train.to(self.device), y_train.to(self.device)
        self.x_val, self.y_val = x_val.to(self.device), y_val.to(self.device)
        self.strategy = strategy
        self.settings = settings
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
        self.generator = torch.Generator().manual_seed(seed)  # batching and augmentation
        self.epoch = 0
        self.bad_epochs = 0
        self.stopped = False
        self.best_val_loss = math.inf
        self.best_epoch = -1
        self.best_state = copy.deepcopy(self.model.state_dict())

    # ------------------------------------------------------------ training --
    def _train_epoch(self, peers: Sequence[nn.Module]) -> tuple[float, float, dict[str, float]]:
        s = self.settings
        self.model.train()
        n = len(self.x_train)
        perm = torch.randperm(n, generator=self.generator).to(self.device)
        loss_sum, correct, seen = 0.0, 0, 0
        term_sums: dict[str, float] = {}
        for start in range(0, n, s.batch_size):
            idx = perm[start : start + s.batch_size]
            if len(idx) < 2:  # batch norm cannot train on a single sample
                continue
            xb = to_float(self.x_train[idx])
            if s.augment:
                xb = random_crop_flip(xb, s.crop_padding, self.generator)
            yb = self.y_train[idx]
            out = self.strategy.loss(self.model, xb, yb, peers=peers)
            self.optimizer.zero_grad(set_to_none=True)
            out.total.backward()
            self.optimizer.step()
            b = len(idx)
            loss_sum += float(out.total.detach()) * b
            seen += b
            if out.logits is not None:
                correct += int((out.logits.argmax(1) == yb).sum())
            for k, v in out.terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + v * b
        seen = max(seen, 1)
        return loss_sum / seen, correct / seen, {k: v / seen for k, v in term_sums.items()}

    def run(
        self, epochs: int, *, peers: Sequence[nn.Module] = (), progress: bool = True, desc: str = "member"
    ) -> list[EpochRecord]:
        """Train up to ``epochs`` more epochs (fewer if early stopping fires)."""
        s = self.settings
        records: list[EpochRecord] = []
        bar = progress_bar(total=epochs, desc=desc, enabled=progress)
        try:
            for _ in range(epochs):
                if self.stopped or self.epoch >= s.epochs:
                    break
                lr = cosine_lr(s.lr, self.epoch, s.epochs)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                train_loss, train_acc, terms = self._train_epoch(peers)
                val_loss, val_acc = evaluate_model(self.model, self.x_val, self.y_val)
                if val_loss < self.best_val_loss:
                    self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, self.epoch, 0
                    self.best_state = copy.deepcopy(self.model.state_dict())
                else:
                    self.bad_epochs += 1
                    self.stopped = self.bad_epochs >= s.patience
                records.append(EpochRecord(self.epoch, lr, train_loss, train_acc, val_loss, val_acc, terms))
                self.epoch += 1
                bar.set_postfix(
                    loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.3f}", refresh=False
                )
                bar.update(1)
            if self.stopped:
                bar.set_postfix_str(f"early stop at epoch {self.epoch}, best {self.best_epoch}", refresh=False)
        finally:
            bar.close()
        return records

    def best_weights(self) -> dict[str, torch.Tensor]:
        """The best-validation checkpoint, on CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.best_state.items()}

    # --------------------------------------------------------- persistence --
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume, as a flat dict of CPU tensors."""
        state = {f"model.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()}
        state |= {f"best.{k}": v.detach().cpu() for k, v in self.best_state.items()}
        for i, p in enumerate(self.model.parameters()):
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                state[f"momentum.{i}"] = buf.detach().cpu()
        state["rng"] = self.generator.get_state()
        state["counters"] = torch.tensor([self.epoch, self.bad_epochs, int(self.stopped), self.best_epoch], dtype=torch.int64)
        state["best_val_loss"] = torch.tensor([self.best_val_loss], dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state)
        self.best_state = {k[len("best.") :]: v.to(self.device).clone() for k, v in state.items() if k.startswith("best.")}
        params = list(self.model.parameters())
        for k, v in state.items():
            if k.startswith("momentum."):
                self.optimizer.state[params[int(k.split(".")[1])]]["momentum_buffer"] = v.to(self.device).clone()
        self.generator.set_state(state["rng"].to(torch.uint8).cpu())
        epoch, bad, stopped, best_epoch = (int(v) for v in state["counters"])
        self.epoch, self.bad_epochs, self.stopped, self.best_epoch = epoch, bad, bool(stopped), best_epoch
        self.best_val_loss = float(state["best_val_loss"][0])


def train_member(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    strategy: TrainingStrategy,
    settings: TrainSettings,
    seed: int,
    *,
    device: torch.device | str = "cpu",
    peers: Sequence[nn.Module] = (),
    progress: bool = True,
    desc: str = "member",
) -> tuple[dict[str, torch.Tensor], list[EpochRecord]]:
    """Train one member for ``settings.epochs`` epochs; return its best weights and history."""
    trainer = MemberTrainer(model, x_train, y_train, x_val, y_val, strategy, settings, seed, device)
    history = trainer.run(settings.epochs, peers=peers, progress=progress, desc=desc)
    return trainer.best_weights(), history
