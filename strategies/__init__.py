"""Training strategies: what a member's loss is.

A strategy is a small object with ``loss(model, x, y, peers=...)`` returning
a :class:`LossTerms` (the total to backpropagate, plus each named term for
logging). It knows nothing about transport: peers, when a strategy needs
them, are plain frozen ``nn.Module`` members handed in by the caller.
Strategies whose ``needs_peers`` is true also offer ``joint_loss`` for
members that live on one node, and optional ``begin_epoch`` hooks are called
by the trainer at the start of each epoch.
"""

from omegaconf import DictConfig

from .adversarial import Adversarial
from .base import LossTerms, TrainingStrategy
from .curvature import Curvature
from .dispersion import Dispersion
from .edlcm import EDLCM
from .plain import Plain

__all__ = ["Adversarial", "Curvature", "Dispersion", "EDLCM", "LossTerms", "Plain", "TrainingStrategy", "build_strategy"]

STRATEGIES: dict[str, type[TrainingStrategy]] = {
    "plain": Plain,
    "curvature": Curvature,
    "dispersion": Dispersion,
    "edlcm": EDLCM,
    "adversarial": Adversarial,
}


def build_strategy(cfg: DictConfig) -> TrainingStrategy:
    """The strategy named by ``cfg.name``, built from the rest of ``cfg``."""
    try:
        cls = STRATEGIES[cfg.name]
    except KeyError:
        raise ValueError(f"unknown strategy '{cfg.name}' (choose from {', '.join(STRATEGIES)})") from None
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    return cls(**kwargs)
