"""Per-sample attack losses. Larger means more adversarial (untargeted).

The surrogate loss changes how tight a robustness estimate is (AutoLoss-AR,
paper 004), so every gradient attack takes one by name, or as a callable
``loss(logits, y) -> (N,)``.

* ``ce``: cross-entropy.
* ``margin``: ``max_{j != y} z_j - z_y`` (Carlini-Wagner margin); > 0 iff misclassified.
* ``dlr``: difference of logits ratio (Croce & Hein 2020),
  ``-(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12)``, invariant to logit scale.
* ``file:PATH``: a searched loss (``best.json`` of ``fedrobust search-loss``; see :mod:`.expression`).
* ``expr:TEXT``: a searched loss by its expression's text form (what a config keeps of a ``file:`` loss,
  so that trials, nodes and caches never read the file again).
* any name given to :func:`register_loss`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .expression import LossExpressionError, SearchedLoss, load_loss_file

__all__ = ["BUILTIN", "EXPR_PREFIX", "FILE_PREFIX", "LOSSES", "LossFn", "attack_loss", "loss_identity", "margin", "register_loss"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FILE_PREFIX = "file:"
EXPR_PREFIX = "expr:"


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


# the built-in losses: the one home of their names (the config's checks, the loss search's baselines and
# held-out tables read them here); fedrobust.attacks.expression.HAND_MADE writes the same three as expressions
LOSSES: dict[str, LossFn] = {"ce": _ce, "margin": margin, "dlr": _dlr}
BUILTIN = tuple(LOSSES)


def register_loss(name: str, loss: LossFn | str) -> None:
    """Make ``name`` usable wherever a loss name is (``attack.whitebox_loss=name``, ``PGD(..., loss=name)``).

    ``loss`` is a callable ``(logits, y) -> (N,)`` or an expression's text form (see :mod:`.expression`).
    """
    if name in BUILTIN or name.startswith((FILE_PREFIX, EXPR_PREFIX)) or not name.isidentifier():
        raise ValueError(f"cannot register a loss as '{name}': a built-in name, or not an identifier")
    LOSSES[name] = SearchedLoss.parse(loss, name=name) if isinstance(loss, str) else loss


def attack_loss(loss: str | LossFn) -> LossFn:
    """The loss a name stands for; a callable is returned as it is."""
    if callable(loss):
        return loss
    if loss.startswith(FILE_PREFIX):
        try:
            return load_loss_file(loss[len(FILE_PREFIX):])
        except LossExpressionError as exc:
            raise ValueError(f"attack loss '{loss}': {exc}") from None
    if loss.startswith(EXPR_PREFIX):
        try:
            return SearchedLoss.parse(loss[len(EXPR_PREFIX):])
        except LossExpressionError as exc:
            raise ValueError(f"attack loss '{loss[:60]}': {exc}") from None
    try:
        return LOSSES[loss]
    except KeyError:
        raise ValueError(f"unknown attack loss '{loss}' (choose from {', '.join(LOSSES)}, file:PATH or expr:TEXT)") from None


def loss_identity(loss: str | LossFn) -> str:
    """What a loss is, for cache keys: its name, or a searched loss's expression (not the file's path)."""
    fn = attack_loss(loss)
    if isinstance(fn, SearchedLoss):
        return f"expr:{fn.text}"
    return loss if isinstance(loss, str) else getattr(fn, "__qualname__", repr(fn))
