"""The interface every training strategy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


@dataclass
class LossTerms:
    """The loss to backpropagate and its named parts (detached floats or 0-d tensors, for logging).

    ``total``'s value is the objective on the batch and its gradient with
    respect to the weights is the objective's. Its graph need not be the
    objective's own: a regulariser with ``grad="fd"`` returns the objective's
    value plus a term that is zero in value and linear in the weights, whose
    gradient is the penalty's (see :mod:`strategies.regulariser`). Callers
    backpropagate it once, into the parameters only.
    """

    total: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)
    logits: torch.Tensor | None = None  # the model's logits on the clean batch, if computed


class TrainingStrategy(ABC):
    """A member's training objective.

    Attributes
    ----------
    name : str
        Config name of the strategy.
    needs_peers : bool
        True when :meth:`loss` uses the other members (dispersion). The caller
        then passes them, frozen and in eval mode, as ``peers``.
    needs_input_grad : bool
        True when :meth:`loss` differentiates with respect to the input
        (curvature, dispersion); the caller leaves autograd enabled for ``x``.
    Config : type or None
        For a plug-in strategy (entry-point group ``fedrobust.strategies``): a
        dataclass whose typed fields, with their defaults, are the keys of
        ``strategy=<name>`` and the keyword arguments of the constructor. None:
        the strategy takes no arguments. The built-in strategies' schemas live
        in :mod:`strategies.settings` and ``conf/strategy/``.
    """

    name: str = "base"
    needs_peers: bool = False
    needs_input_grad: bool = False
    Config: ClassVar[type | None] = None

    def begin_batch(self, step: int) -> None:
        """Called by the trainer before every batch with the member's global step (epoch * batches + batch)."""

    @abstractmethod
    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        peers: Sequence[nn.Module] = (),
    ) -> LossTerms:
        """Loss of ``model`` on the batch ``(x, y)``; ``x`` is in [0, 1]."""
