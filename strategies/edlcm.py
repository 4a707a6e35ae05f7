"""EDLCM: curvature + dispersion, ``ce + alpha * L_r + beta * L_g`` (EDLCM eq. 11), alpha=1, beta=0.01.

``clip_grad_norm`` (default 2) bounds the member's weight gradient, the
stabiliser of :mod:`strategies.curvature` (see :mod:`strategies.regulariser`,
"Stability").
"""

from __future__ import annotations

from .dispersion import Dispersion
from .regulariser import CLIP_GRAD_NORM

__all__ = ["EDLCM"]


class EDLCM(Dispersion):
    name = "edlcm"

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.01,
        h: float | None = None,
        every: int = 1,
        grad: str = "fd",
        fd_step: float | None = None,
        clip_grad_norm: float | None = CLIP_GRAD_NORM,
    ) -> None:
        super().__init__(beta=beta, h=h, alpha=alpha, every=every, grad=grad, fd_step=fd_step, clip_grad_norm=clip_grad_norm)
