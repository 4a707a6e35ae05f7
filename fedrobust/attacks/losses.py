"""Per-sample attack losses. Larger means more adversarial (untargeted).

The surrogate loss changes how tight a robustness estimate is (AutoLoss-AR,
paper 004), so every gradient attack takes one of these by name.

* ``ce``: cross-entropy.
* ``margin``: ``max_{j != y} z_j - z_y`` (Carlini-Wagner margin); > 0 iff misclassified.
* ``dlr``: difference of logits ratio (Croce & Hein 2020),
  ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)``, invariant to logit scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "attack_loss", "margin"]


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    top = logits.sort(dim=1, descending=True).values
    third = top[:, 2] if logits.shape[1] > 2 else top[:, -1]
    return margin(logits, y) / (top[:, 0] - third + 1e-12)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"ce": _ce, "margin": margin, "dlr": _dlr}


def attack_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown attack loss '{name}' (choose from {', '.join(LOSSES)})") from None
