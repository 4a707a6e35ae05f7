"""Finite-difference Hessian-vector products along the gradient sign (EDLCM eq. 8).

For member m and input x (per sample n): ``g = sign(grad_x ce) / ||sign(grad_x ce)||``
(detached, unit L2 norm per sample) and

    ``D_m(x) = grad_x ce(x + h g) - grad_x ce(x)``  ( = h * Hg + O(h^2) ),

where ``ce`` is each sample's own cross-entropy, so ``D`` holds per-sample
input gradients, not gradients of the batch mean. The curvature penalty is
``mean_n ||D_n||^2`` (eq. 9) and the dispersion term compares directions of
``D`` across members (eq. 10), for which the 1/h factor does not matter.

Default ``h``: the L2 radius of the L-inf ball of radius 8/255,
``h = (8/255) * sqrt(D)`` for D input values. The penalty then measures how the
gradient changes across the neighbourhood an attack explores; CURE, which
introduced this penalty, used h = 1.5 on CIFAR-10, and this rule gives 1.74
there (0.25 on 8x8 digits). Much smaller h turns the difference into float32
round-off; much larger h leaves the local quadratic regime.

The perturbed forward pass runs the model in its current mode but leaves
batch-norm running statistics untouched, so the regulariser does not count
every batch twice in them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_RADIUS", "default_h", "frozen_running_stats", "gradient_difference", "sign_direction"]

DEFAULT_RADIUS = 8 / 255


def default_h(x: torch.Tensor) -> float:
    return DEFAULT_RADIUS * math.sqrt(x[0].numel())


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Run forward passes without changing batch-norm running statistics.

    Batch-norm layers stop tracking for the duration: in training mode they
    normalise with the batch's statistics as usual but neither read nor
    update the running ones (nor count the batch); in eval mode they use the
    running statistics as before.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def sign_direction(grad: torch.Tensor) -> torch.Tensor:
    """``sign(grad) / ||sign(grad)||`` per sample (zero where the gradient is zero), detached."""
    s = grad.detach().sign()
    return s / s.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (s.dim() - 1)))


def gradient_difference(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, h: float, *, create_graph: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at x and ``grad ce(x + h g) - grad ce(x)`` per sample.

    With ``create_graph=True`` the difference is differentiable with respect to
    the parameters (double backpropagation); otherwise it is detached.
    """
    x0 = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x0)
        (g0,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x0, create_graph=create_graph)
        x1 = (x.detach() + h * sign_direction(g0)).requires_grad_(True)
        with frozen_running_stats(model):
            (g1,) = torch.autograd.grad(
                F.cross_entropy(model(x1), y, reduction="sum"), x1, create_graph=create_graph
            )
    diff = g1 - g0
    return (logits, diff) if create_graph else (logits.detach(), diff.detach())
