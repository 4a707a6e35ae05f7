"""The ensemble, and the checks a member passes before it joins.

Members live in an ``nn.ModuleList``, so ``.to()``, ``.eval()`` and attack
code see them. By default inference averages logits before the softmax (no
weight averaging: :class:`LogitAverageEnsemble`). The ensemble is kept in
eval mode: ``train()`` is refused.

How members combine (``ensemble.combine``). One member that scales its
logits by 100 decides every prediction of a logit average; the other rules
bound what one member can do. Every rule but the first returns the log of the
combined probabilities, normalised to sum to 1 (logits to every attack):

=======================  ======================================================
``mean_logits``          the mean of the members' logits (the default)
``mean_probs``           log of the mean of the members' softmax probabilities
``median_probs``         log of the per-class median of the probabilities
``trimmed_mean_probs``   log of the per-class mean after dropping the ``trim``
                         highest and lowest members' probabilities
``majority_vote``        the class most members predict; ties go to the class
                         with the highest mean probability
=======================  ======================================================

All but ``majority_vote`` are differentiable almost everywhere, so gradient
attacks run through them as they are. A vote's gradient is zero almost
everywhere; its output is ``log((votes + lam * mean_probs) / (1 + lam))``,
with ``votes`` the fraction of members for each class and ``lam = 1e-3``: the
same prediction as the vote (``lam * mean_probs < 1 / M`` only decides ties),
and a gradient, through the tie-break term, that points where the members'
mean probability goes. Sign-based and step-size-adaptive attacks (FGSM, PGD,
APGD) depend on its direction only. Transfer and query attacks use the
outputs as they are. Probabilities are clamped at 1e-30 before the log.

Vectorised forward. When every member has the same architecture (the same
module classes, parameter and buffer names, shapes, dtypes and device), the
members can run as one batched call: their weights stacked along a new
leading axis and one member's structure mapped over that axis (``torch.func.vmap`` of ``functional_call``). vmap turns
each convolution into one grouped convolution over all members, so the
ensemble costs one kernel launch per layer instead of one per member and
layer. That pays where launches dominate (a GPU, small models), and not on a
CPU, which is compute-bound either way and runs grouped convolutions
slower: on 2 cores, 3, 5 and 7 ResNet-18s ran at 0.67x, 0.53x and 0.53x the
loop's speed (``benchmarks/bench_gpu.py``). So ``vectorise="auto"`` (the default)
vectorises on CUDA only; ``True`` forces it wherever the members allow it,
``False`` never. Mixed architectures (the surrogate zoo) always take the loop.

The stacked weights are a copy made on every vectorised call with
``torch.stack`` (not ``torch.func.stack_module_state``, whose stacks are
detached leaves): a member changed in place (``load_state_dict``, an
optimiser step, ``.data``) is never served stale, and with weights that
require gradients the copy is part of the graph, so gradients still reach
the members. The copy costs two passes over the weights (the stack, then a
row-major clone: see ``_stacked``), a small fraction of a forward pass over a
batch. Logits agree with the loop's to float32 round-off
(the grouped convolution sums in another order): ``tests/test_vectorised.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, vmap

from .ensemble_settings import COMBINE

__all__ = ["COMBINE", "Ensemble", "InvalidUpdateError", "LogitAverageEnsemble", "combine_logits",
           "validate_member_weights"]

VOTE_TIE_BREAK = 1e-3  # majority_vote: the weight of the mean probability that breaks ties and carries gradients
_TINY = 1e-30


def _median(p: torch.Tensor) -> torch.Tensor:
    """The median over dim 0 (the mean of the two middle values for an even count)."""
    s = p.sort(0).values
    m = s.shape[0]
    return s[m // 2] if m % 2 else 0.5 * (s[m // 2 - 1] + s[m // 2])


def combine_logits(logits: torch.Tensor, rule: str = "mean_logits", trim: int = 1) -> torch.Tensor:
    """The ensemble's output from its members' logits ``(M, N, C)``: see the module docstring."""
    if rule == "mean_logits":
        return logits.mean(0)
    probs = logits.softmax(-1)
    if rule == "mean_probs":
        out = probs.mean(0)
    elif rule == "median_probs":
        out = _median(probs)
    elif rule == "trimmed_mean_probs":
        m = probs.shape[0]
        if 2 * trim >= m:
            raise ValueError(f"trimmed_mean_probs: trimming {trim} from each side leaves none of {m} member(s)")
        out = probs.sort(0).values[trim:m - trim].mean(0)
    elif rule == "majority_vote":
        votes = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(probs.dtype).mean(0)
        out = (votes + VOTE_TIE_BREAK * probs.mean(0)) / (1.0 + VOTE_TIE_BREAK)
    else:
        raise ValueError(f"unknown combination rule '{rule}' (choose from {', '.join(COMBINE)})")
    out = out.clamp_min(_TINY)
    return (out / out.sum(-1, keepdim=True)).log()  # a median's or a trimmed mean's sum is not 1


class InvalidUpdateError(ValueError):
    """A node's reply that must not enter the ensemble. The message names the node."""


def _structure(m: nn.Module) -> tuple:
    """What two members must share to run as one vectorised call."""
    modules = tuple((name, type(mod)) for name, mod in m.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device)
                    for name, t in [*m.named_parameters(), *m.named_buffers()])
    return modules, tensors


class Ensemble(nn.Module):
    """The members combined by ``combine`` (a rule of :data:`COMBINE`; ``trim`` for ``trimmed_mean_probs``),
    always in eval mode.

    ``vectorise``: ``"auto"`` (vectorised on CUDA when the members share an
    architecture, the loop otherwise), ``True`` (vectorised whenever they
    share one) or ``False`` (always the loop). See the module docstring.
    """

    def __init__(self, members: Iterable[nn.Module], vectorise: bool | str = "auto", combine: str = "mean_logits",
                 trim: int = 1) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        if len(self.members) == 0:
            raise ValueError("an ensemble needs at least one member")
        if vectorise not in ("auto", True, False):
            raise ValueError(f"vectorise must be 'auto', True or False, got {vectorise!r}")
        if combine not in COMBINE:
            raise ValueError(f"unknown combination rule '{combine}' (choose from {', '.join(COMBINE)})")
        if combine == "trimmed_mean_probs" and 2 * trim >= len(self.members):
            raise ValueError(f"trimmed_mean_probs: trimming {trim} from each side leaves none of "
                             f"{len(self.members)} member(s)")
        self.combine, self.trim = combine, int(trim)
        self.vectorise = vectorise
        self._shared: bool | None = None  # whether the members share one architecture (and device), once known
        self._template: list[nn.Module] = []  # a list, so that the template is no submodule (no state, no .to())
        super().train(False)

    def train(self, mode: bool = True) -> Ensemble:
        if mode:
            raise RuntimeError(f"{type(self).__name__} is an inference model; train its members instead")
        return super().train(False)

    def _apply(self, fn, recurse: bool = True):
        self._shared = None  # .to(), .half(), ...: devices and dtypes may have changed
        return super()._apply(fn, recurse)

    @property
    def vectorised(self) -> bool:
        """Whether the next forward call runs the members as one vectorised call."""
        if self.vectorise is False or (self.vectorise == "auto" and len(self.members) < 2):
            return False
        first = next(iter(self.members[0].parameters()), None)
        if first is None or (self.vectorise == "auto" and first.device.type != "cuda"):
            return False
        if self._shared is None:
            shape = _structure(self.members[0])
            self._shared = all(_structure(m) == shape for m in self.members[1:])
        return self._shared

    def _stacked(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Every member's parameters and buffers, stacked along a new leading axis (a copy, made per call)."""
        def stack(named) -> dict[str, torch.Tensor]:
            per_member = [dict(named(m)) for m in self.members]
            # row-major: the members' convolution weights are channels-last, and under vmap that layout sends
            # pooling to a slow fallback (as_strided_ has no batching rule); clone, as .contiguous() keeps the
            # strides of a weight with a dimension of size 1 (a 1x1 or depthwise convolution)
            return {name: torch.stack([state[name] for state in per_member]).clone(memory_format=torch.contiguous_format)
                    for name in per_member[0]}

        return stack(nn.Module.named_parameters), stack(nn.Module.named_buffers)

    def _forward_vectorised(self, x: torch.Tensor) -> torch.Tensor:
        if not self._template:
            template = copy.deepcopy(self.members[0]).to("meta")
            self._template.append(template.eval())
        template = self._template[0]
        params, buffers = self._stacked()
        return vmap(lambda p, b: functional_call(template, (p, b), (x,)), randomness="error")(params, buffers)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every member's logits, ``(M, N, C)``."""
        if self.vectorised:
            return self._forward_vectorised(x)
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return combine_logits(self.member_logits(x), self.combine, self.trim)


class LogitAverageEnsemble(Ensemble):
    """Mean of the members' logits (``combine="mean_logits"``), always in eval mode."""

    def __init__(self, members: Iterable[nn.Module], vectorise: bool | str = "auto") -> None:
        super().__init__(members, vectorise)


def validate_member_weights(
    arrays: Mapping[str, np.ndarray | torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    who: str,
) -> dict[str, torch.Tensor]:
    """Check a reply's arrays against the model's state dict and return them as tensors.

    Names must match exactly; each array must have the reference's shape and
    dtype; floating arrays must be finite. Raises :class:`InvalidUpdateError`
    naming ``who`` (e.g. ``"node 2"``) on the first violation.
    """
    got, want = set(arrays), set(reference)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}")
        raise InvalidUpdateError(f"{who}: rejected update, array names differ from the model ({'; '.join(parts)})")
    out: dict[str, torch.Tensor] = {}
    for name, ref in reference.items():
        value = arrays[name]
        t = torch.from_numpy(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
        if tuple(t.shape) != tuple(ref.shape):
            raise InvalidUpdateError(f"{who}: rejected update, '{name}' has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise InvalidUpdateError(f"{who}: rejected update, '{name}' has dtype {t.dtype}, expected {ref.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidUpdateError(f"{who}: rejected update, '{name}' has non-finite values (NaN or inf)")
        out[name] = t.detach().cpu().clone()
    return out
