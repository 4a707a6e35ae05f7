"""The regularised objective and its weight gradient: exact, or from first-order passes.

Curvature and dispersion (EDLCM eq. 9-11) add to the members' cross-entropy a
penalty ``P(D_1, ..., D_M)`` of their gradient differences
``D_m = grad_x S_m(x + h g_m) - grad_x S_m(x)`` (:mod:`strategies.hessian`;
``S`` is the batch's summed cross-entropy, so ``D`` holds per-sample input
gradients). ``P`` depends on member m's weights only through ``D_m``, so its
weight gradient is the vector-Jacobian product ``J_theta(D_m)^T u_m`` with
``u_m = dP/dD_m``: ``2 alpha D / B`` for the curvature penalty
``alpha * mean_n ||D_n||^2``, the derivative of the cosines for dispersion
(peers frozen), their sum for EDLCM. Two ways to compute it:

``grad="exact"``
    Double backpropagation: ``D`` is built with ``create_graph=True`` and the
    objective is differentiated through it. It differentiates each of the
    two gradient graphs once more, about twice their cost: an exact epoch
    measured 5.4-6.1x plain on the digits CNN and 4.3-5.5x on ResNet-18 (2
    CPU cores, with batch norm, whose double backward is many small
    element-wise kernels), and some kernels (fused attention) have no double
    backward at all.

``grad="fd"`` (default)
    First-order passes only. For a fixed input y,
    ``J_theta(grad_x S(y))^T u = grad_theta <grad_x S(y), u>``, and the
    directional derivative ``<grad_x S(y), u> = (S(y + eps u) - S(y)) / eps + O(eps)``
    (with the activation pattern of y held fixed, see below).
    With ``x1 = x + h g`` (detached, as in the exact form), the penalty's
    weight gradient is therefore

        (1/eps) [grad S(x1 + eps u) - grad S(x1) - grad S(x + eps u) + grad S(x)] + O(eps)

    the weight gradient of the surrogate scalar
    ``ce_mean(x) + (1/eps)[S(x1 + eps u) - S(x1) - S(x + eps u) + S(x)]``
    at detached inputs. The passes at x and x1 are needed anyway for ``D``;
    each gives its input gradient and its weight gradient from one backward
    (``torch.autograd.grad`` over the input and the parameters together), and
    once ``u``, and with it eps, is known, two more forward+backward passes at
    ``x + eps u`` and ``x1 + eps u`` give the rest. Four passes in all, the
    cost floor of the penalty, and no second-order kernels. The four weight
    gradients are combined pairwise, ``(g(x1 + eps u) - g(x1)) - (g(x + eps u) - g(x))``,
    before the 1/eps, so that the large common parts cancel first.

The activation pattern. Between y and y + eps u some ReLUs of a real
network always switch, and each switch adds ``grad_theta z / eps`` to the
difference: without care the float32 error is 8 to 200 times the gradient
itself, for every eps. Double backpropagation holds the pattern of y fixed
(ReLU'' = 0), and so do the passes at ``x + eps u`` and ``x1 + eps u``: they
replay the ReLU masks and max-pool argmaxes recorded on the passes at x and
x1 (:mod:`strategies.pattern`). The replayed network is smooth in its input
(batch norm and softmax are), so the difference has an ordinary O(eps) error.

The step eps. A one-sided difference errs by truncation, proportional to the
displacement, plus round-off, inversely proportional to it; the textbook step
balancing the two is ``sqrt(machine_eps)`` of the input's scale. Inputs are
images in [0, 1], so the scale of one value is 1 and that of sample n is
``sqrt(d)`` for d values. eps is set per batch so that the most displaced
sample moves by ``delta`` per value, RMS:
``eps * max_n ||u_n|| / sqrt(d) = delta``, with ``delta = sqrt(machine_eps) / 3``
of the compute dtype (1.2e-4 in float32, 5e-9 in float64; ``fd_step``
overrides it). Every other sample moves less, so none leaves the linear
regime, and the round-off of a weight-gradient difference belongs to the
whole batch, not to one sample. The third: measured in float32 with
train-mode batch norm, the error is smallest near delta = 5e-4 on the digits
CNN and near 4e-5 on ResNet-18 (deeper, with more batch-norm curvature), and
at 1e-4 the penalty's gradient is within 0.9% of the exact one on both, at
initialisation and after training (``tests/test_regulariser.py``). In
float64 the error falls in proportion to delta down to 1e-8. The
displacement is about 250 times smaller than h's (8/255 per value), so the
difference probes the gradient at x and at x1, not between them.

Precision. The objective always runs with autocast off, in the dtype of its
input (fp32 in training), even inside ``train.precision=bf16|fp16``: in
bf16 (8 bits of mantissa) ``sqrt(machine_eps)`` is 0.06 per value, so the
displacement could no longer be both small against h and large against
round-off. Only the plain cross-entropy batches of ``every > 1`` gain from
reduced precision.

Batch norm: the pass at x runs as plain training does and updates the
running statistics; the passes at x1, x + eps u and x1 + eps u use batch
statistics but leave the running ones alone (:func:`~strategies.hessian.frozen_running_stats`).

Both forms return a loss whose value is the objective ``sum_m ce_m + P`` and
whose gradient is the objective's (``fd``: to O(eps)); the ``fd`` loss is the
objective's detached value plus a term that is zero in value and whose
gradient is the combined one, so callers backpropagate it like any loss.
With every penalty weight zero, ``u = 0``, the extra passes are skipped and
the gradient is plain training's, bit for bit.

Stability (``clip``, ``strategy.clip_grad_norm``, default 2). Whenever a
penalty weight is non-zero, each member's weight gradient (its
cross-entropy's and its penalty's together) is scaled down to L2 norm
``clip`` when it is longer, as ``torch.nn.utils.clip_grad_norm_`` does; a
non-finite gradient is left as it is, and with every penalty weight zero
nothing is clipped, so training is plain's bit for bit. The objective, D
and the terms are those of eq. 7-11; only the length of a step is bounded.
Why, measured on ResNet-18 with CIFAR-shaped inputs (3x32x32, 10 classes,
batch 128, seed 0, float32), alpha 1 and the default h (1.74):

* At initialisation ce is 2.36 and the penalty 45, and the penalty's weight
  gradient has norm 174 against 7.3 for ce's: 24 times larger, and
  concentrated on the last layers (62 on the final linear layer, whose
  weights have norm 1.8). One SGD step at lr 0.1 moves that layer by three
  times its own size, so the logits' scale, and every input gradient with
  it, jumps: the penalty rises from 45 to 3,300 after one step, the weights'
  norm from 82 to 1,400 after two, and the loss is NaN at the fifth step
  (lr 0.4: ce 26 after one step, NaN at the fifth).
* At lr 0.4 cross-entropy alone overshoots too (plain training, 128 images,
  one step per epoch: training loss 2.4 to 28 and validation loss 1e10 in 6
  steps), but ce grows only linearly with the logits, the penalty with
  their square, so with the penalty on the overshoot overflows.
* So bounding the penalty's part alone is not enough: clipped at norm 1 it
  still gave ce 29, penalty 2,100 and validation loss 5e7 after 4 steps at
  lr 0.4. Clipping the whole gradient at 10 kept 8 steps finite, but ce
  rose to 51 and the penalty stayed above 500: a step of 4 still tripled
  the penalty. At 2 the step at lr 0.4 is at most 0.8 (before momentum),
  and 10 epochs were finite, the penalty falling from 44 to 1.1
  (benchmarks/resnet18_stability.py; figures in docs/strategies.md).
* The digits CNN is never clipped at 2: its whole gradient stayed below 1.22
  over 10 epochs at lr 0.1 (1,200 images), so its runs are unchanged.

Written here because no maintained library computes this penalty's gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .hessian import frozen_running_stats, gradient_difference, sign_direction
from .pattern import ActivationPattern, record, replay

__all__ = ["GRADS", "CLIP_GRAD_NORM", "Objective", "check_clip", "check_grad", "clip_factor", "fd_step_size", "regularised_objective"]

GRADS = ("fd", "exact")

# Default bound on the L2 norm of a member's weight gradient (see "Stability" above)
CLIP_GRAD_NORM = 2.0

Terms = Callable[[list[torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class Objective:
    """``sum_m ce_m + sum_k weight_k * term_k`` on one batch, ready to backpropagate."""

    total: torch.Tensor  # value: the objective; gradient: the objective's
    ce: list[float]  # each member's mean cross-entropy
    logits: list[torch.Tensor]  # each member's logits at x, detached
    terms: dict[str, float] = field(default_factory=dict)  # the unweighted penalty terms


def check_grad(grad: str, fd_step: float | None = None) -> None:
    """Refuse an unknown gradient form or a non-positive step, with a ValueError."""
    if grad not in GRADS:
        raise ValueError(f"unknown grad '{grad}' (choose from {', '.join(GRADS)})")
    if fd_step is not None and fd_step <= 0:
        raise ValueError(f"fd_step must be > 0, got {fd_step}")


def check_clip(clip: float | None) -> None:
    """Refuse a non-positive bound on the penalty's gradient norm, with a ValueError."""
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")


def fd_step_size(u: torch.Tensor, step: float | None = None) -> float:
    """eps with ``eps * max_n ||u_n|| / sqrt(d) = step`` (default ``sqrt(machine_eps) / 3`` of u's dtype).

    0 if u = 0; NaN if u is not finite (a diverged penalty), so that the
    gradient is NaN too, as double backpropagation's would be.
    """
    if step is None:
        step = math.sqrt(torch.finfo(u.dtype).eps) / 3
    rms = float(u.flatten(1).norm(dim=1).max()) / math.sqrt(u[0].numel())
    if not math.isfinite(rms):
        return math.nan
    return step / rms if rms > 0 else 0.0


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _grads(model: nn.Module, params, x, y, reduction: str, input_grad: bool, mode):
    """Logits and the gradients of the batch cross-entropy w.r.t. (input, params) from one backward."""
    xi = x.detach().requires_grad_(input_grad)
    with torch.enable_grad():
        with mode:
            logits = model(xi)
        loss = F.cross_entropy(logits, y, reduction=reduction)
        grads = torch.autograd.grad(loss, [xi, *params] if input_grad else params, allow_unused=True)
    return logits.detach(), loss.detach(), list(grads)


@dataclass
class _Probe:
    """Passes at x and x1 = x + h g of one member (first-order form)."""

    params: list[nn.Parameter]
    logits: torch.Tensor
    ce: torch.Tensor
    diff: torch.Tensor  # D, detached
    x1: torch.Tensor
    grads_x: list  # weight gradients of ce_mean at x
    grads_x1: list  # weight gradients of S at x1
    pattern_x: ActivationPattern
    pattern_x1: ActivationPattern


def _probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, h: float) -> _Probe:
    params = _params(model)
    at_x, at_x1 = ActivationPattern(), ActivationPattern()
    # as plain training, running statistics included
    logits, ce, (gx, *grads_x) = _grads(model, params, x, y, "mean", True, record(at_x))
    gx = gx * len(y)  # gradient of the sum: per-sample input gradients
    x1 = x.detach() + h * sign_direction(gx)
    with frozen_running_stats(model):
        _, _, (gx1, *grads_x1) = _grads(model, params, x1, y, "sum", True, record(at_x1))
    return _Probe(params, logits, ce, gx1 - gx, x1, grads_x, grads_x1, at_x, at_x1)


def _fd_penalty_gradient(model: nn.Module, pr: _Probe, x, y, u: torch.Tensor, step: float | None) -> list:
    """Weight gradient of ``<D, u>`` (the penalty's), from the passes at x + eps u and x1 + eps u; None where unused."""
    eps = fd_step_size(u, step)
    if eps == 0.0:
        return [None] * len(pr.params)
    with frozen_running_stats(model):
        _, _, grads_xu = _grads(model, pr.params, x.detach() + eps * u, y, "sum", False, replay(pr.pattern_x))
        _, _, grads_x1u = _grads(model, pr.params, pr.x1 + eps * u, y, "sum", False, replay(pr.pattern_x1))
    n, out = len(y), []
    for g0, g1, g0u, g1u in zip(pr.grads_x, pr.grads_x1, grads_xu, grads_x1u):
        if g0 is None and g1 is None and g0u is None and g1u is None:
            out.append(None)
            continue
        zero = next(g for g in (g0, g1, g0u, g1u) if g is not None).new_zeros(())
        g0, g1, g0u, g1u = (zero if g is None else g for g in (g0, g1, g0u, g1u))
        at_x1 = g1u - g1
        at_x = g0u - n * g0
        out.append((at_x1 - at_x) / eps)
    return out


def _combine(ce_grads: Sequence, penalty_grads: Sequence) -> list:
    """``ce + penalty`` per parameter (None where both are None)."""
    return [gc if gp is None else gp if gc is None else gc + gp for gc, gp in zip(ce_grads, penalty_grads)]


def _scaled(grads: Sequence, factor: float) -> list:
    return list(grads) if factor == 1.0 else [None if g is None else g * factor for g in grads]


def _fd_gradient(model: nn.Module, pr: _Probe, x, y, u: torch.Tensor, step: float | None) -> list:
    """Weight gradient of ``ce_mean(x) + <D, u>``: the passes at x + eps u and x1 + eps u."""
    return _combine(pr.grads_x, _fd_penalty_gradient(model, pr, x, y, u, step))


def clip_factor(grads: Sequence, max_norm: float | None) -> float:
    """``min(1, max_norm / ||grads||)`` over all tensors (as ``torch.nn.utils.clip_grad_norm_``).

    1 without a bound, and 1 for a non-finite norm, so that a diverged
    penalty still shows as a non-finite gradient instead of a clipped one.
    """
    if max_norm is None:
        return 1.0
    present = [g for g in grads if g is not None]
    if not present:
        return 1.0
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in present])))
    if not math.isfinite(norm) or norm <= max_norm:
        return 1.0
    return max_norm / norm


class _WeightGradient(torch.autograd.Function):
    """A zero scalar whose gradient with respect to each parameter is a given tensor."""

    @staticmethod
    def forward(ctx, grads, *params):
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, grad_output):
        return (None, *(None if g is None else g * grad_output for g in ctx.grads))


def _linear_in_weights(params: Sequence[nn.Parameter], grads: Sequence) -> torch.Tensor:
    """Zero in value, with gradient ``grads[i]`` for ``params[i]``: the first-order form's weight gradient as a loss."""
    return _WeightGradient.apply(list(grads), *params)


def regularised_objective(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    h: float,
    terms: Terms,
    weights: dict[str, float],
    grad: str = "fd",
    fd_step: float | None = None,
    clip: float | None = None,
) -> Objective:
    """``sum_m ce_m(x) + sum_k weights[k] * terms(D_1..D_M)[k]`` and its weight gradient.

    ``terms`` maps the members' gradient differences to named scalar
    penalties; it must be differentiable in them (it is called on the graph
    in the exact form and on detached leaves in the first-order form).
    ``clip`` bounds the L2 norm of each member's weight gradient (its
    cross-entropy's and the penalty's together) whenever a penalty weight is
    non-zero; None leaves it unbounded.
    """
    check_grad(grad, fd_step)
    check_clip(clip)
    # fp32 whatever the caller's autocast: the finite difference's step is sized to fp32's round-off
    with torch.autocast(x.device.type, enabled=False):
        return _objective(models, x, y, h=h, terms=terms, weights=weights, grad=grad, fd_step=fd_step, clip=clip)


def _objective(models, x, y, *, h, terms, weights, grad, fd_step, clip) -> Objective:
    if grad == "exact":
        pairs = [gradient_difference(m, x, y, h, create_graph=True) for m in models]
        ces = [F.cross_entropy(z, y) for z, _ in pairs]
        values = terms([d for _, d in pairs])
        penalty = sum((w * values[k] for k, w in weights.items()), ces[0].new_zeros(()))
        total = sum(ces[1:], ces[0]) + penalty
        if clip is not None and any(weights.values()):
            total = _clipped_exact(models, total, clip)
        return Objective(total, [float(c.detach()) for c in ces], [z.detach() for z, _ in pairs],
                         {k: float(v.detach()) for k, v in values.items()})

    probes = [_probe(m, x, y, h) for m in models]
    leaves = [p.diff.detach().requires_grad_(True) for p in probes]
    with torch.enable_grad():
        values = terms(leaves)
        penalty = sum((w * values[k] for k, w in weights.items()), leaves[0].new_zeros(()))
    if penalty.requires_grad:
        us = torch.autograd.grad(penalty, leaves, allow_unused=True)
    else:
        us = (None,) * len(leaves)
    ces = torch.stack([p.ce for p in probes])
    value = ces.sum() + penalty.detach()
    linear = value.new_zeros(())
    for model, pr, u in zip(models, probes, us):
        u = torch.zeros_like(pr.diff) if u is None else u
        grads = _combine(pr.grads_x, _fd_penalty_gradient(model, pr, x, y, u, fd_step))
        factor = clip_factor(grads, clip) if any(weights.values()) else 1.0
        linear = linear + _linear_in_weights(pr.params, _scaled(grads, factor))
    return Objective(value + linear, [float(c) for c in ces], [p.logits for p in probes],
                     {k: float(v.detach()) for k, v in values.items()})


def _clipped_exact(models, total, clip: float) -> torch.Tensor:
    """The exact form's loss with each member's weight gradient clipped (one backward, inside)."""
    groups = [_params(m) for m in models]
    grads = torch.autograd.grad(total, [p for g in groups for p in g], allow_unused=True)
    linear, start = total.new_zeros(()), 0
    for params in groups:
        own = grads[start : start + len(params)]
        start += len(params)
        linear = linear + _linear_in_weights(params, _scaled(own, clip_factor(own, clip)))
    return total.detach() + linear
