"""EDLCM: curvature + dispersion, ``ce + alpha * L_r + beta * L_g`` (EDLCM eq. 11), alpha=1, beta=0.01."""

from __future__ import annotations

from .dispersion import Dispersion

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
    ) -> None:
        super().__init__(beta=beta, h=h, alpha=alpha, every=every, grad=grad, fd_step=fd_step)
