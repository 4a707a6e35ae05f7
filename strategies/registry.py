"""The strategies a config may name: the built-in ones, and plug-ins registered with :func:`register_strategy`.

:func:`build_strategy` makes one from its config section (``strategy.name``
and the strategy's keys, :mod:`.settings`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig

from .adversarial import Adversarial
from .base import TrainingStrategy
from .curvature import Curvature
from .dispersion import Dispersion
from .edlcm import EDLCM
from .plain import Plain

__all__ = ["BUILT_IN", "STRATEGIES", "build_strategy", "register_strategy"]

STRATEGIES: dict[str, type[TrainingStrategy]] = {
    "plain": Plain,
    "curvature": Curvature,
    "dispersion": Dispersion,
    "edlcm": EDLCM,
    "adversarial": Adversarial,
}


BUILT_IN = tuple(STRATEGIES)


def register_strategy(cls: type[TrainingStrategy], name: str | None = None) -> type[TrainingStrategy]:
    """Make ``cls`` buildable as strategy ``name`` (default: ``cls.name``); a built-in name cannot be taken."""
    name = name or cls.name
    if not (isinstance(cls, type) and issubclass(cls, TrainingStrategy)):
        raise TypeError(f"strategy '{name}': {cls!r} is not a TrainingStrategy subclass")
    if name in BUILT_IN and STRATEGIES.get(name) is not cls:
        raise ValueError(f"strategy '{name}' is built in; a plug-in needs a name of its own")
    STRATEGIES[name] = cls
    return cls


def build_strategy(cfg: DictConfig | str, args: Mapping[str, Any] | None = None) -> TrainingStrategy:
    """The strategy named ``cfg`` with arguments ``args``, or named by ``cfg.name`` and built from the rest of ``cfg``."""
    if isinstance(cfg, str):
        name, kwargs = cfg, dict(args or {})
    else:
        name, kwargs = cfg.name, {k: v for k, v in cfg.items() if k != "name"}
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy '{name}' (choose from {', '.join(STRATEGIES)})") from None
    return cls(**kwargs)
