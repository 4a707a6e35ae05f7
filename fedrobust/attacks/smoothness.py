"""Smoothness diagnostics of the input-space loss landscape.

* :func:`hvp`: exact input Hessian-vector product by double backpropagation.
* :func:`fd_hvp`: the finite difference ``(grad L(x + h v) - grad L(x)) / h``
  that the curvature and dispersion regularisers use (EDLCM eq. 8-10,
  AdvRush eq. 9-10).
* :func:`hessian_lambda_max`: the largest eigenvalue of each sample's input
  Hessian of the cross-entropy, by power iteration on exact HVPs. Samples are
  independent in eval mode, so the Hessian of the summed loss is block
  diagonal and one batched HVP serves every sample at once; each sample gets
  its own vector, normalisation and Rayleigh quotient.
* :func:`gradient_cosine`: per-sample cosine similarity of the input gradients
  of two models (surrogate vs target, the main paper's Fig. 1).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["fd_hvp", "gradient_cosine", "hessian_lambda_max", "hvp", "input_gradient"]

Model = Callable[[torch.Tensor], torch.Tensor]


def _loss(model: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y, reduction="sum")


def input_gradient(model: Model, x: torch.Tensor, y: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """Per-sample gradient of the cross-entropy with respect to the input."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(_loss(model, x, y), x, create_graph=create_graph)
    return g


def hvp(model: Model, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact per-sample input Hessian-vector product ``H(x) v``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(_loss(model, x, y), x, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), x)
    return hv


def fd_hvp(model: Model, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor, h: float = 1e-3) -> torch.Tensor:
    """Finite-difference ``(grad L(x + h v) - grad L(x)) / h``; error O(h) for smooth models."""
    return (input_gradient(model, x + h * v, y) - input_gradient(model, x, y)) / h


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-20).view(-1, *([1] * (v.dim() - 1)))


def hessian_lambda_max(
    model: Model,
    x: torch.Tensor,
    y: torch.Tensor,
    iters: int = 20,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Dominant eigenvalue (largest in magnitude) of each sample's input Hessian, by power iteration.

    Stops when every sample's Rayleigh quotient changes by less than ``tol``
    (relative). Returns a tensor of shape ``(N,)``.
    """
    g = generator or torch.Generator().manual_seed(0)
    v = _unit(torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device))
    lam = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        hv = hvp(model, x, y, v)
        new = (hv * v).flatten(1).sum(1)  # Rayleigh quotient, v has unit norm
        converged = bool(((new - lam).abs() <= tol * new.abs().clamp_min(1e-12)).all())
        lam = new
        v = _unit(hv)
        if converged:
            break
    return lam.detach()


def gradient_cosine(model_a: Model, model_b: Model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity between the two models' input gradients."""
    ga, gb = input_gradient(model_a, x, y), input_gradient(model_b, x, y)
    return F.cosine_similarity(ga.flatten(1), gb.flatten(1), dim=1, eps=1e-20).detach()
