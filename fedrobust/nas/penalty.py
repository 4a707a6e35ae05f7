"""AdvRush's smoothness penalty (eq. 10): ``L_lambda = ||grad_x l(x + h z*) - grad_x l(x)||``.

``l`` is the supernet's cross-entropy on clean validation images and
``z* = sign(grad_x l) / ||sign(grad_x l)||`` the high-curvature direction
(the same finite-difference Hessian probe as ``strategy=curvature``, eq. 9,
with the ``1/h`` absorbed into gamma). Each image's own input gradient is
taken, and the penalty is the mean over the batch of each image's L2 norm
(the paper writes one norm; per image keeps it independent of batch size).

Both gradients keep their graphs (double backpropagation), so the penalty
is differentiable with respect to every parameter, the architecture
parameters included; ``z*`` is a direction, held fixed (detached), as in
CURE. Batch-norm running statistics are left untouched by the two extra
passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from strategies.hessian import frozen_running_stats, sign_direction

__all__ = ["smoothness_penalty"]


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x, create_graph=True)
    return g


def smoothness_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, h: float,
                       direction: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_n ||grad l(x_n + h z*_n) - grad l(x_n)||_2``; ``direction`` fixes ``z*`` (a unit vector per image)."""
    with torch.enable_grad(), frozen_running_stats(model):
        g0 = _input_grad(model, x, y)
        z = sign_direction(g0) if direction is None else direction.detach()
        g1 = _input_grad(model, x.detach() + h * z, y)
    # sqrt(sum + tiny): a finite gradient where the difference is exactly zero
    return (g1 - g0).flatten(1).pow(2).sum(1).add(1e-24).sqrt().mean()
