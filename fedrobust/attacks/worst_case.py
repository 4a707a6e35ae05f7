"""The worst case over every point an attack evaluated: one mechanism for all attacks that query the target.

A robust accuracy is an upper bound on the truth only if an attack never
credits the model with an image it broke along the way. An attack that
steps past a misclassified point to a point of higher loss that is
classified correctly (APGD keeping its best-loss point, PGD and BIM
returning their last iterate, Square keeping the point of lowest loss)
would do exactly that. AutoAttack avoids it by tracking, per image, whether
any evaluated point was already adversarial; :class:`WorstCase` is that
bookkeeping, shared by the gradient attacks (:mod:`.gradient`) and Square
(:mod:`.square`).

An attack hands every forward pass it makes on the target to
:meth:`WorstCase.observe`; at the end, :meth:`WorstCase.select` returns,
per image, the first observed point inside the budget that the target
misclassified, or the attack's own answer where there was none.
:attr:`WorstCase.found` says which images were broken, from the same logits
the attack saw, so a caller can count an image as broken even if a
re-evaluation in another batch composition would round a near-tie the
other way.

The clean point is observed first (the attacks' ``run`` does it before
their first step): an image the model gets wrong at ``x`` is broken at
distance 0, wherever the attack then goes.

Transfer attacks never query the target while they craft (they run on
surrogates), so they do not use it: their answer is their last iterate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttackResult", "Robust", "WorstCase", "robust_images", "worst_case_accuracy"]

# Slack on the budget check: projection and clamping are exact in float32 up to rounding.
_TOLERANCE = 1e-6


@dataclass
class AttackResult:
    """An attack's answer per image, and whether the attack saw the image misclassified."""

    x_adv: torch.Tensor
    success: torch.Tensor  # bool per image: some evaluated point inside the budget was misclassified
    fallback: torch.Tensor | None = None  # bool per image: cross-entropy stood in for a non-finite loss


class WorstCase:
    """Per image, the first evaluated point inside the budget that the model misclassified.

    Parameters
    ----------
    x, y:
        The clean images and their labels; the budget is measured around ``x``.
    eps:
        The budget's radius.
    norm:
        ``"linf"`` or ``"l2"``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf") -> None:
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got '{norm}'")
        self.x, self.y = x.detach(), y.detach()
        self.eps, self.norm = float(eps), norm
        self.found = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.x_found = self.x.clone()

    def _inside(self, x_eval: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        delta = (x_eval - x).flatten(1)
        size = delta.norm(dim=1) if self.norm == "l2" else delta.abs().amax(1)
        in_range = (x_eval.flatten(1).amin(1) >= -_TOLERANCE) & (x_eval.flatten(1).amax(1) <= 1 + _TOLERANCE)
        return (size <= self.eps * (1 + _TOLERANCE) + _TOLERANCE) & in_range

    @torch.no_grad()
    def observe(self, x_eval: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Record one forward pass: ``logits = model(x_eval)``, for all images or for the images ``rows``."""
        x_eval, logits = x_eval.detach(), logits.detach()
        x, y, found = (self.x, self.y, self.found) if rows is None else (self.x[rows], self.y[rows], self.found[rows])
        new = (logits.argmax(1) != y) & ~found & self._inside(x_eval, x)
        if not bool(new.any()):
            return
        idx = new.nonzero().squeeze(1) if rows is None else rows[new]
        self.x_found[idx] = x_eval[new].to(self.x_found.dtype)
        self.found[idx] = True

    def select(self, x_answer: torch.Tensor) -> torch.Tensor:
        """The first misclassified point where one was seen, else the attack's own answer."""
        shape = (-1,) + (1,) * (self.x.dim() - 1)
        return torch.where(self.found.view(shape), self.x_found, x_answer.detach())

    def result(self, x_answer: torch.Tensor) -> AttackResult:
        return AttackResult(self.select(x_answer), self.found.clone())


@dataclass
class Robust:
    """Per image of a sample: whether it withstood an attack, and where cross-entropy stood in for its loss."""

    robust: torch.Tensor  # bool per image: classified correctly at x and at every point the attack evaluated
    fallback: torch.Tensor  # bool per image

    @property
    def accuracy(self) -> float:
        return float(self.robust.float().mean()) if len(self.robust) else 0.0


@torch.no_grad()
def _correct(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1) == y


def robust_images(target, attack, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Robust:
    """Which images of ``(x, y)`` withstand ``attack`` on ``target``, batch by batch.

    An image is broken if the target misclassifies it at ``x``, at the attack's answer, or at any point the
    attack reports it saw misclassified (``attack.run(x, y).success``, where the attack has ``run``); a plain
    ``(x, y) -> x_adv`` callable is scored on its answers and the clean images.
    """
    robust, fallback = [], []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        ok = _correct(target, xb, yb)
        if hasattr(attack, "run"):
            res = attack.run(xb, yb)
            ok &= _correct(target, res.x_adv, yb) & ~res.success.to(yb.device)
            fb = res.fallback if getattr(res, "fallback", None) is not None else torch.zeros_like(ok)
        else:
            ok &= _correct(target, attack(xb, yb), yb)
            fb = torch.zeros_like(ok)
        robust.append(ok)
        fallback.append(fb.to(ok.device))
    empty = torch.zeros(0, dtype=torch.bool, device=y.device)
    return Robust(torch.cat(robust) if robust else empty, torch.cat(fallback) if fallback else empty)


def worst_case_accuracy(target, attack, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Robust accuracy of ``target`` under ``attack`` (:func:`robust_images`' share of robust images)."""
    return robust_images(target, attack, x, y, batch_size).accuracy
