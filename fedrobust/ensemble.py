"""The logit-averaged ensemble, and the checks a member passes before it joins.

Members live in an ``nn.ModuleList``, so ``.to()``, ``.eval()`` and attack
code see them. Inference averages logits before the softmax (no weight
averaging). The ensemble is kept in eval mode: ``train()`` is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["InvalidUpdateError", "LogitAverageEnsemble", "validate_member_weights"]


class InvalidUpdateError(ValueError):
    """A node's reply that must not enter the ensemble. The message names the node."""


class LogitAverageEnsemble(nn.Module):
    """Mean of the members' logits, always in eval mode."""

    def __init__(self, members: Iterable[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        if len(self.members) == 0:
            raise ValueError("an ensemble needs at least one member")
        super().train(False)

    def train(self, mode: bool = True) -> LogitAverageEnsemble:
        if mode:
            raise RuntimeError("LogitAverageEnsemble is an inference model; train its members instead")
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


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
