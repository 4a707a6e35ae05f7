"""Adversarial training with a dynamic budget and an adaptive clean/adversarial weight (paper 002).

* Dynamic budget (Alg. 1): the training epsilon starts at ``eps_start * eps``
  (eps/10 by default) and rises linearly to ``eps`` at the last epoch.
* Adaptive loss (sec. 3.2): ``L = a * ce(x) + (1 - a) * ce(x_adv)`` with
  ``a = acc_adv / (acc_adv + acc_clean)`` measured on the validation split at
  the start of each epoch, so training leans on adversarial examples while
  the member is not robust, and back on clean ones as it becomes robust.

The attack is step 2's :class:`~fedrobust.attacks.gradient.PGD` (step
``2.5 * eps / steps``, random start) or FGSM, run in train mode with
batch-norm running statistics frozen. Its random start is seeded by the
member's seed and the epoch, so a run resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import LossTerms, TrainingStrategy
from .hessian import frozen_running_stats

__all__ = ["Adversarial"]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as float32, from uint8 or float storage."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


class Adversarial(TrainingStrategy):
    name = "adversarial"

    def __init__(self, attack: str = "pgd", eps: float = 8 / 255, steps: int = 7, eps_start: float = 0.1) -> None:
        if attack not in ("pgd", "fgsm"):
            raise ValueError(f"attack must be 'pgd' or 'fgsm', got '{attack}'")
        if eps <= 0 or steps < 1 or not 0 < eps_start <= 1:
            raise ValueError(f"need eps > 0, steps >= 1, 0 < eps_start <= 1; got {eps}, {steps}, {eps_start}")
        self.attack_name, self.eps, self.steps, self.eps_start = attack, float(eps), int(steps), float(eps_start)
        self.current_eps = self.eps
        self.clean_weight = 0.5
        self._seed = 0

    def epsilon_at(self, epoch: int, total_epochs: int) -> float:
        frac = epoch / max(total_epochs - 1, 1)
        return self.eps * (self.eps_start + (1.0 - self.eps_start) * frac)

    def _attack(self, model: nn.Module, eps: float, worst_case: bool):
        from fedrobust.attacks import FGSM, PGD

        if self.attack_name == "fgsm":
            return FGSM(model, eps, worst_case=worst_case)
        return PGD(model, eps, self.steps, seed=self._seed, worst_case=worst_case)

    def _craft(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
        # training points are the attack's last iterate (Madry et al.), not the first point that fools the model
        with frozen_running_stats(model):
            return self._attack(model, eps, worst_case=False)(x, y)

    def begin_epoch(
        self, model: nn.Module, epoch: int, total_epochs: int, x_val, y_val, seed: int, *, batch_size: int | None = None
    ) -> dict[str, float]:
        """Set the epoch's budget and clean weight from the clean and adversarial accuracy on ``(x_val, y_val)``.

        ``x_val`` holds images in [0, 1], as floats or as uint8 (converted a
        batch at a time). The attack runs on ``batch_size`` images at a time
        (None: the whole split in one batch), so memory is bounded by the
        batch, not the split: one attack on all 10,000 CIFAR-10 validation
        images through a ResNet-18 would hold every image's activations for
        the backward pass at once. One attack object serves all batches, so
        its random starts are drawn in sequence from the one seeded generator.
        """
        from fedrobust.attacks import predict

        self._seed = seed * 100003 + epoch
        self.current_eps = self.epsilon_at(epoch, total_epochs)
        n = len(y_val)
        step = n if batch_size is None else int(batch_size)
        if step < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = model.training
        model.eval()
        attack = self._attack(model, self.current_eps, worst_case=True)  # an image broken on the way is broken
        clean = adv = 0
        for start in range(0, n, step):
            xb, yb = _as_float(x_val[start : start + step]), y_val[start : start + step]
            clean += int((predict(model, xb) == yb).sum())
            res = attack.run(xb, yb)
            adv += int(((predict(model, res.x_adv) == yb) & ~res.success).sum())
        model.train(was_training)
        # as a float32 mean of the hits, the figure the one-batch form gave
        acc_clean, acc_adv = (float(torch.tensor(k, dtype=torch.float32) / n) if n else 0.0 for k in (clean, adv))
        self.clean_weight = acc_adv / (acc_adv + acc_clean) if acc_adv + acc_clean > 0 else 0.5
        return {"eps": self.current_eps, "clean_weight": self.clean_weight, "val_adv_acc": acc_adv}

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, peers: Sequence[nn.Module] = ()) -> LossTerms:
        x_adv = self._craft(model, x, y, self.current_eps)
        logits = model(x)
        ce_clean = F.cross_entropy(logits, y)
        ce_adv = F.cross_entropy(model(x_adv), y)
        a = self.clean_weight
        total = a * ce_clean + (1.0 - a) * ce_adv
        return LossTerms(total, {"ce_clean": float(ce_clean.detach()), "ce_adv": float(ce_adv.detach())}, logits.detach())
