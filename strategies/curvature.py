"""Curvature regularisation: ``ce + alpha * mean_n ||grad ce(x + h g) - grad ce(x)||^2`` (EDLCM eq. 9, CURE, AdvRush eq. 9-10).

The penalty's weight gradient comes from four first-order passes
(``grad="fd"``, the default) or from double backpropagation
(``grad="exact"``); see :mod:`strategies.regulariser`, and
:mod:`strategies.hessian` for ``g``, ``h`` and batch-norm handling.

``clip_grad_norm`` (default 2, None: off) bounds the L2 norm of the
member's weight gradient while the penalty is on: a stabiliser, not a
different penalty. Without it ResNet-18 at alpha 1 and the default h
diverges at lr 0.1 and 0.4: at initialisation the penalty's weight gradient
is 24 times ce's (norm 174 against 7.3), one step multiplies the final
layer's weights several times over, and the loss is NaN at the fifth step.
Measurements and the choice of the bound: :mod:`strategies.regulariser`,
"Stability".

``every=k`` (opt-in, default 1 = every batch, as in the paper) applies the
penalty on one batch in k, scaled by k, and plain cross-entropy on the
others ("lazy regularisation", as StyleGAN2 does for R1): the same expected
gradient at about 1/k of the regulariser's cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import LossTerms, TrainingStrategy
from .hessian import default_h
from .plain import Plain
from .regulariser import CLIP_GRAD_NORM, check_clip, check_grad, regularised_objective

__all__ = ["Curvature", "curvature_penalty"]


def curvature_penalty(diff: torch.Tensor) -> torch.Tensor:
    """``mean_n ||diff_n||^2`` over the batch."""
    return diff.flatten(1).pow(2).sum(1).mean()


class Curvature(TrainingStrategy):
    name = "curvature"
    needs_input_grad = True

    def __init__(
        self,
        alpha: float = 1.0,
        h: float | None = None,
        every: int = 1,
        grad: str = "fd",
        fd_step: float | None = None,
        clip_grad_norm: float | None = CLIP_GRAD_NORM,
    ) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if h is not None and h <= 0:
            raise ValueError(f"h must be > 0, got {h}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        check_grad(grad, fd_step)
        check_clip(clip_grad_norm)
        self.alpha, self.h, self.every = float(alpha), h, int(every)
        self.grad, self.fd_step, self.clip_grad_norm = grad, fd_step, clip_grad_norm
        self._step = 0

    def begin_batch(self, step: int) -> None:
        self._step = step

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, peers: Sequence[nn.Module] = ()) -> LossTerms:
        if self._step % self.every:
            return Plain().loss(model, x, y)
        obj = regularised_objective(
            [model], x, y, h=self.h if self.h is not None else default_h(x),
            terms=lambda diffs: {"curvature": curvature_penalty(diffs[0])},
            weights={"curvature": self.every * self.alpha}, grad=self.grad, fd_step=self.fd_step,
            clip=self.clip_grad_norm,
        )
        return LossTerms(obj.total, {"ce": obj.ce[0], "curvature": obj.terms["curvature"]}, obj.logits[0])
