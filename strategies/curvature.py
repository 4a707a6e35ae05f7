"""Curvature regularisation: ``ce + alpha * mean_n ||grad ce(x + h g) - grad ce(x)||^2`` (EDLCM eq. 9, CURE, AdvRush eq. 9-10).

Needs double backpropagation: the gradient difference is built with
``create_graph=True`` so that the penalty is differentiable in the weights.
See :mod:`strategies.hessian` for ``g``, ``h`` and batch-norm handling.

``every=k`` (opt-in, default 1 = every batch, as in the paper) applies the
penalty on one batch in k, scaled by k, and plain cross-entropy on the
others ("lazy regularisation", as StyleGAN2 does for R1): the same expected
gradient at about 1/k of the regulariser's cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import LossTerms, TrainingStrategy
from .hessian import default_h, gradient_difference
from .plain import Plain

__all__ = ["Curvature", "curvature_penalty"]


def curvature_penalty(diff: torch.Tensor) -> torch.Tensor:
    """``mean_n ||diff_n||^2`` over the batch."""
    return diff.flatten(1).pow(2).sum(1).mean()


class Curvature(TrainingStrategy):
    name = "curvature"
    needs_input_grad = True

    def __init__(self, alpha: float = 1.0, h: float | None = None, every: int = 1) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if h is not None and h <= 0:
            raise ValueError(f"h must be > 0, got {h}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.alpha, self.h, self.every = float(alpha), h, int(every)
        self._step = 0

    def begin_batch(self, step: int) -> None:
        self._step = step

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, peers: Sequence[nn.Module] = ()) -> LossTerms:
        if self._step % self.every:
            return Plain().loss(model, x, y)
        h = self.h if self.h is not None else default_h(x)
        logits, diff = gradient_difference(model, x, y, h, create_graph=True)
        ce = F.cross_entropy(logits, y)
        reg = curvature_penalty(diff)
        total = ce + self.every * self.alpha * reg
        return LossTerms(total, {"ce": float(ce.detach()), "curvature": float(reg.detach())}, logits.detach())
