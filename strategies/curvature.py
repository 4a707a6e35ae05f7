"""Curvature regularisation: ``ce + alpha * mean_n ||grad ce(x + h g) - grad ce(x)||^2`` (EDLCM eq. 9, CURE, AdvRush eq. 9-10).

Needs double backpropagation: the gradient difference is built with
``create_graph=True`` so that the penalty is differentiable in the weights.
See :mod:`strategies.hessian` for ``g``, ``h`` and batch-norm handling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import LossTerms, TrainingStrategy
from .hessian import default_h, gradient_difference

__all__ = ["Curvature", "curvature_penalty"]


def curvature_penalty(diff: torch.Tensor) -> torch.Tensor:
    """``mean_n ||diff_n||^2`` over the batch."""
    return diff.flatten(1).pow(2).sum(1).mean()


class Curvature(TrainingStrategy):
    name = "curvature"
    needs_input_grad = True

    def __init__(self, alpha: float = 1.0, h: float | None = None) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if h is not None and h <= 0:
            raise ValueError(f"h must be > 0, got {h}")
        self.alpha, self.h = float(alpha), h

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, peers: Sequence[nn.Module] = ()) -> LossTerms:
        h = self.h if self.h is not None else default_h(x)
        logits, diff = gradient_difference(model, x, y, h, create_graph=True)
        ce = F.cross_entropy(logits, y)
        reg = curvature_penalty(diff)
        total = ce + self.alpha * reg
        return LossTerms(total, {"ce": float(ce.detach()), "curvature": float(reg.detach())}, logits.detach())
