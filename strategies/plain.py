"""Plain training: cross-entropy only."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import LossTerms, TrainingStrategy


class Plain(TrainingStrategy):
    name = "plain"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, peers: Sequence[nn.Module] = ()) -> LossTerms:
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return LossTerms(total=ce, terms={"ce": ce.detach()}, logits=logits.detach())
