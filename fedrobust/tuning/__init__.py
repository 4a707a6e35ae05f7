"""Hyperparameter studies and sweeps: NSGA-II (Optuna) on Ray, one-at-a-time grids, reports.

The ``tune`` and ``ray`` config sections are :mod:`.settings`. The names
below are imported on first use (:mod:`fedrobust.lazy`), so that the config's
schema loads without the tuner, Ray or Optuna.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:
    from .outputs import pareto_front
    from .space import SearchSpace
    from .study import run_study

__all__ = ["SearchSpace", "pareto_front", "run_study"]

__getattr__, __dir__ = lazy_names(__name__, {"SearchSpace": ".space", "pareto_front": ".outputs", "run_study": ".study"})
