"""Training strategies: what a member's loss is.

A strategy is a small object with ``loss(model, x, y, peers=...)`` returning
a :class:`LossTerms` (the total to backpropagate, plus each named term for
logging). It knows nothing about transport: peers, when a strategy needs
them, are plain frozen ``nn.Module`` members handed in by the caller.
Strategies whose ``needs_peers`` is true also offer ``joint_loss`` for
members that live on one node, and optional ``begin_epoch`` hooks are called
by the trainer at the start of each epoch.

:data:`STRATEGIES` holds the built-in strategies (:mod:`.registry`);
installed packages add theirs through the ``fedrobust.strategies``
entry-point group (:func:`fedrobust.plugins.load_plugins` calls
:func:`register_strategy`). The ``strategy`` config section, each
strategy's keys and their checks, is :mod:`.settings`.

The names below are imported on first use (:mod:`fedrobust.lazy`), so that
the config section's schema loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedrobust.lazy import lazy_names

if TYPE_CHECKING:
    from .adversarial import Adversarial
    from .base import LossTerms, TrainingStrategy
    from .curvature import Curvature
    from .dispersion import Dispersion
    from .edlcm import EDLCM
    from .plain import Plain
    from .registry import BUILT_IN, STRATEGIES, build_strategy, register_strategy

__all__ = ["BUILT_IN", "Adversarial", "Curvature", "Dispersion", "EDLCM", "LossTerms", "Plain", "STRATEGIES",
           "TrainingStrategy", "build_strategy", "register_strategy"]

__getattr__, __dir__ = lazy_names(__name__, {
    "Adversarial": ".adversarial", "LossTerms": ".base", "TrainingStrategy": ".base", "Curvature": ".curvature",
    "Dispersion": ".dispersion", "EDLCM": ".edlcm", "Plain": ".plain",
    **dict.fromkeys(["BUILT_IN", "STRATEGIES", "build_strategy", "register_strategy"], ".registry"),
})
