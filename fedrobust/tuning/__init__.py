"""Hyperparameter studies and sweeps: NSGA-II (Optuna) on Ray, one-at-a-time grids, reports."""

from .outputs import pareto_front
from .space import SearchSpace
from .study import run_study

__all__ = ["SearchSpace", "pareto_front", "run_study"]
