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

A member whose training or validation loss becomes non-finite has diverged:
it stops at once, and :attr:`MemberTrainer.divergence` says at which epoch,
which loss, and the last finite training loss before it. Its weights never
stand in for a trained member (:func:`train_member` raises
:class:`DivergedError`; the server applies ``engine.on_missing``).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from strategies import TrainingStrategy

from .augment import crop_flip, draw_crop_flip
from .data import to_float
from .progress import progress as progress_bar

__all__ = [
    "Divergence",
    "DivergedError",
    "EpochRecord",
    "MemberTrainer",
    "MomentumSGD",
    "TrainSettings",
    "cosine_lr",
    "autocast",
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


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for ``precision`` on ``device``'s type; a no-op context for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
    return torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32")


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
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler)


@dataclass
class EpochRecord:
    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    terms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Divergence:
    """Where a member's loss became non-finite.

    ``epoch`` counts from 0, as ``EpochRecord.epoch`` and ``best_epoch`` do;
    ``loss`` is ``"train"`` (the epoch's mean training loss) or
    ``"validation"``; ``value`` is the non-finite value; ``last_finite_loss``
    is the mean training loss of the last epoch where it was finite (None if
    there was none).
    """

    epoch: int
    loss: str
    value: float
    last_finite_loss: float | None

    def describe(self) -> str:
        last = "none" if self.last_finite_loss is None else f"{self.last_finite_loss:.4g}"
        return f"diverged at epoch {self.epoch} ({self.loss} loss {self.value}; last finite loss {last})"

    def as_dict(self) -> dict:
        """Strict-JSON fields (the non-finite value as text)."""
        return {"epoch": self.epoch, "loss": self.loss, "value": str(self.value),
                "last_finite_loss": self.last_finite_loss}


class DivergedError(RuntimeError):
    """A member diverged (non-finite loss) and the run may not go on without it; the message is one line."""


_LOSS_KINDS = ("train", "validation")


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


class MomentumSGD:
    """``torch.optim.SGD`` (momentum, weight decay), stepped through its functional form.

    ``step`` makes the call that ``torch.optim.SGD.step`` makes, to
    ``torch.optim.sgd.sgd`` with the same arguments, so parameters and momentum
    buffers are ``torch.optim.SGD``'s bit for bit (tests/test_training.py checks
    it). It is not a ``torch.optim.Optimizer`` because constructing one imports
    ``torch._dynamo``: about 2 s of CPU, paid by every process that trains (each
    Flower actor and ClientApp process, each Ray trial worker) and more than
    importing torch itself. ``param_groups`` and ``state`` have the optimizer's
    layout, which is all :class:`torch.amp.GradScaler` and the code below use.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, momentum: float, weight_decay: float) -> None:
        self.param_groups = [{"params": list(params), "lr": lr, "momentum": momentum, "weight_decay": weight_decay}]
        self.state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in (p for group in self.param_groups for p in group["params"]):
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        from torch.optim.sgd import sgd

        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            buffers = [self.state.get(p, {}).get("momentum_buffer") for p in params]
            sgd(params, [p.grad for p in params], buffers, weight_decay=group["weight_decay"],
                momentum=group["momentum"], lr=group["lr"], dampening=0.0, nesterov=False, maximize=False)
            if group["momentum"] != 0:
                for p, buf in zip(params, buffers):
                    self.state[p]["momentum_buffer"] = buf


class MemberTrainer:
    """Trains one member, or several jointly; call :meth:`run` once, or once per round.

    With several models (all members of one node under a strategy that needs
    peers), every batch goes through ``strategy.joint_loss`` and one optimiser
    steps all of them; early stopping then watches the members' mean
    validation loss and keeps their checkpoints from the same epoch.
    """

    def __init__(
        self,
        model: nn.Module | Sequence[nn.Module],
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
        self.models = [m.to(self.device) for m in ([model] if isinstance(model, nn.Module) else model)]
        # channels-last, the layout build_model gives and the convolution kernels prefer on CPU and CUDA alike
        self.channels_last = x_train.dim() == 4
        if self.channels_last:
            self.models = [m.to(memory_format=torch.channels_last) for m in self.models]
        if len(self.models) > 1 and not hasattr(strategy, "joint_loss"):
            raise ValueError(f"strategy '{strategy.name}' cannot train members jointly")
        self.x_train, self.y_train = x_train.to(self.device), y_train.to(self.device)
        self.x_val, self.y_val = x_val.to(self.device), y_val.to(self.device)
        self.strategy = strategy
        self.settings = settings
        self.seed = seed
        self.params = [p for m in self.models for p in m.parameters()]
        self.optimizer = MomentumSGD(
            self.params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
        self.generator = torch.Generator().manual_seed(seed)  # batching and augmentation
        # fp16 needs loss scaling against gradient underflow; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=settings.precision == "fp16")
        self.epoch = 0
        self.bad_epochs = 0
        self.stopped = False
        self.best_val_loss = math.inf
        self.best_epoch = -1
        self.best_states = [copy.deepcopy(m.state_dict()) for m in self.models]
        self.last_finite_loss: float | None = None  # the latest finite epoch training loss
        self.divergence: Divergence | None = None
        self._peer_diffs: list[torch.Tensor] | None = None

    @property
    def model(self) -> nn.Module:
        return self.models[0]

    # ------------------------------------------------------------ training --
    def _prepare_peers(self, peers: Sequence[nn.Module]) -> None:
        """Without augmentation, the frozen peers' directions depend only on the image: compute them once."""
        self._peer_diffs = None
        if not peers or not self.strategy.needs_peers or self.settings.augment:
            return
        if len(peers) * self.x_train.numel() * 4 > 2**30:  # keep the cache under 1 GiB
            return
        chunks: list[list[torch.Tensor]] = [[] for _ in peers]
        for start in range(0, len(self.x_train), 512):
            xb = to_float(self.x_train[start : start + 512])
            for k, d in enumerate(self.strategy.peer_differences(peers, xb, self.y_train[start : start + 512])):
                chunks[k].append(d)
        self._peer_diffs = [torch.cat(c) for c in chunks]

    def _batch_loss(self, xb, yb, idx, peers):
        if len(self.models) > 1:
            out, logits = self.strategy.joint_loss(self.models, xb, yb)
            correct = sum((z.argmax(1) == yb).sum() for z in logits) / len(logits)
            return out, correct
        if self._peer_diffs is not None:
            out = self.strategy.loss(self.model, xb, yb, peers=peers, peer_diffs=[d[idx] for d in self._peer_diffs])
        else:
            out = self.strategy.loss(self.model, xb, yb, peers=peers)
        correct = (out.logits.argmax(1) == yb).sum() if out.logits is not None else 0
        return out, correct

    def _train_epoch(self, peers: Sequence[nn.Module]) -> tuple[float, float, dict[str, float]]:
        """One epoch. Batches are gathered and augmented on the device from index tensors drawn once per
        epoch, and the running sums stay on the device, so no batch waits for a copy or a sync."""
        s = self.settings
        for m in self.models:
            m.train()
        n = len(self.x_train)
        perm = torch.randperm(n, generator=self.generator).to(self.device)
        if s.augment:
            dy, dx, flip = (t.to(self.device) for t in draw_crop_flip(n, s.crop_padding, self.generator))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        term_sums: dict[str, float | torch.Tensor] = {}
        term_seen: dict[str, int] = {}
        batches = math.ceil(n / s.batch_size)
        for b_idx, start in enumerate(range(0, n, s.batch_size)):
            self.strategy.begin_batch(self.epoch * batches + b_idx)
            idx = perm[start : start + s.batch_size]
            if len(idx) < 2:  # batch norm cannot train on a single sample
                continue
            xb = to_float(self.x_train[idx])
            if s.augment:
                part = slice(start, start + len(idx))
                xb = crop_flip(xb, dy[part], dx[part], flip[part], s.crop_padding)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = self.y_train[idx]
            with autocast(self.device, s.precision):
                out, batch_correct = self._batch_loss(xb, yb, idx, peers)
            self.optimizer.zero_grad(set_to_none=True)
            # no gradients for the inputs a strategy differentiated
            self.scaler.scale(out.total).backward(inputs=self.params)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            b = len(idx)
            loss_sum += out.total.detach().double() * b
            seen += b
            correct += batch_correct
            for k, v in out.terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + (v.double() if isinstance(v, torch.Tensor) else v) * b
                term_seen[k] = term_seen.get(k, 0) + b
        seen = max(seen, 1)
        return float(loss_sum) / seen, float(correct) / seen, {k: float(v) / term_seen[k] for k, v in term_sums.items()}

    def _validate(self) -> tuple[float, float]:
        scores = [evaluate_model(m, self.x_val, self.y_val) for m in self.models]
        return sum(v[0] for v in scores) / len(scores), sum(v[1] for v in scores) / len(scores)

    def run(
        self, epochs: int, *, peers: Sequence[nn.Module] = (), progress: bool = True, desc: str = "member"
    ) -> list[EpochRecord]:
        """Train up to ``epochs`` more epochs (fewer if early stopping fires)."""
        s = self.settings
        records: list[EpochRecord] = []
        peers = list(peers)
        for p in peers:
            p.to(self.device).eval().requires_grad_(False)
        if not self.stopped and self.epoch < s.epochs:
            self._prepare_peers(peers)
        bar = progress_bar(total=epochs, desc=desc, enabled=progress)
        try:
            for _ in range(epochs):
                if self.stopped or self.epoch >= s.epochs:
                    break
                lr = cosine_lr(s.lr, self.epoch, s.epochs)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                hook_terms = {}
                if hasattr(self.strategy, "begin_epoch"):
                    hook_terms = self.strategy.begin_epoch(
                        self.model, self.epoch, s.epochs, self.x_val, self.y_val, self.seed, batch_size=s.batch_size
                    ) or {}
                train_loss, train_acc, terms = self._train_epoch(peers)
                terms |= hook_terms
                # The epoch's loss sum is already on the host: a non-finite batch loss shows here, at no
                # extra sync. Weights that produced it are not validated.
                if math.isfinite(train_loss):
                    val_loss, val_acc = self._validate()
                else:
                    val_loss, val_acc = math.nan, math.nan
                records.append(EpochRecord(self.epoch, lr, train_loss, train_acc, val_loss, val_acc, terms))
                if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                    kind, value = ("train", train_loss) if not math.isfinite(train_loss) else ("validation", val_loss)
                    if kind == "validation":
                        self.last_finite_loss = train_loss
                    self.divergence = Divergence(self.epoch, kind, value, self.last_finite_loss)
                    self.stopped = True
                    self.epoch += 1
                    bar.update(1)
                    break
                self.last_finite_loss = train_loss
                if val_loss < self.best_val_loss:
                    self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, self.epoch, 0
                    self.best_states = [copy.deepcopy(m.state_dict()) for m in self.models]
                else:
                    self.bad_epochs += 1
                    self.stopped = self.bad_epochs >= s.patience
                self.epoch += 1
                bar.set_postfix(
                    loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}", val_acc=f"{val_acc:.3f}", refresh=False
                )
                bar.update(1)
            if self.divergence is not None:
                bar.set_postfix_str(self.divergence.describe(), refresh=False)
            elif self.stopped:
                bar.set_postfix_str(f"early stop at epoch {self.epoch}, best {self.best_epoch}", refresh=False)
        finally:
            bar.close()
            self._peer_diffs = None
        return records

    def best_weights(self, k: int = 0) -> dict[str, torch.Tensor]:
        """Member ``k``'s best-validation checkpoint, on CPU; a diverged member has none (:class:`DivergedError`)."""
        if self.divergence is not None:
            raise DivergedError(f"member {self.divergence.describe()}: it has no trained weights")
        return {name: v.detach().cpu().clone() for name, v in self.best_states[k].items()}

    def current_weights(self, k: int = 0) -> dict[str, torch.Tensor]:
        return {name: v.detach().cpu().clone() for name, v in self.models[k].state_dict().items()}

    # --------------------------------------------------------- persistence --
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume, as a flat dict of CPU tensors."""
        state: dict[str, torch.Tensor] = {}
        for k, (m, best) in enumerate(zip(self.models, self.best_states)):
            state |= {f"model.{k}.{n}": v.detach().cpu() for n, v in m.state_dict().items()}
            state |= {f"best.{k}.{n}": v.detach().cpu() for n, v in best.items()}
        for i, p in enumerate(self.params):
            buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                state[f"momentum.{i}"] = buf.detach().cpu()
        if self.scaler.is_enabled():
            sd = self.scaler.state_dict()
            state["scaler"] = torch.tensor([sd["scale"], sd["_growth_tracker"]], dtype=torch.float64)
        state["rng"] = self.generator.get_state()
        state["counters"] = torch.tensor([self.epoch, self.bad_epochs, int(self.stopped), self.best_epoch], dtype=torch.int64)
        state["best_val_loss"] = torch.tensor([self.best_val_loss], dtype=torch.float64)
        state["last_finite_loss"] = torch.tensor([_or_nan(self.last_finite_loss)], dtype=torch.float64)
        if self.divergence is not None:
            d = self.divergence
            state["divergence"] = torch.tensor(
                [d.epoch, _LOSS_KINDS.index(d.loss), d.value, _or_nan(d.last_finite_loss)], dtype=torch.float64
            )
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, m in enumerate(self.models):
            prefix, best_prefix = f"model.{k}.", f"best.{k}."
            m.load_state_dict({n[len(prefix) :]: v for n, v in state.items() if n.startswith(prefix)})
            self.best_states[k] = {
                n[len(best_prefix) :]: v.to(self.device).clone() for n, v in state.items() if n.startswith(best_prefix)
            }
        for n, v in state.items():
            if n.startswith("momentum."):
                self.optimizer.state[self.params[int(n.split(".")[1])]]["momentum_buffer"] = v.to(self.device).clone()
        if "scaler" in state and self.scaler.is_enabled():
            scale, tracker = (float(v) for v in state["scaler"])
            self.scaler.load_state_dict(self.scaler.state_dict() | {"scale": scale, "_growth_tracker": int(tracker)})
        self.generator.set_state(state["rng"].to(torch.uint8).cpu())
        epoch, bad, stopped, best_epoch = (int(v) for v in state["counters"])
        self.epoch, self.bad_epochs, self.stopped, self.best_epoch = epoch, bad, bool(stopped), best_epoch
        self.best_val_loss = float(state["best_val_loss"][0])
        last = float(state["last_finite_loss"][0]) if "last_finite_loss" in state else math.nan
        self.last_finite_loss = last if math.isfinite(last) else None
        self.divergence = None
        if "divergence" in state:
            epoch, kind, value, last = (float(v) for v in state["divergence"])
            last_or_none = last if math.isfinite(last) else None
            self.divergence = Divergence(int(epoch), _LOSS_KINDS[int(kind)], value, last_or_none)


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


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
    """Train one member for ``settings.epochs`` epochs; return its best weights and history.

    A member that diverges raises :class:`DivergedError` (its weights are not a trained member).
    """
    trainer = MemberTrainer(model, x_train, y_train, x_val, y_val, strategy, settings, seed, device)
    history = trainer.run(settings.epochs, peers=peers, progress=progress, desc=desc)
    if trainer.divergence is not None:
        raise DivergedError(f"{desc} {trainer.divergence.describe()}; lower its learning rate")
    return trainer.best_weights(), history
