"""Checks of the ``tune`` config section, next to the tuner that reads it.

:func:`validate_tune` rejects values that are well-typed but impossible, with
a one-line :class:`~fedrobust.config.ConfigError` naming the key;
Importing this module registers the check with
:func:`fedrobust.config.register_check` (:mod:`fedrobust.validation` does).
It imports nothing of the tuner itself.
"""

from __future__ import annotations

from omegaconf import DictConfig

from ..config import ConfigError, register_check

__all__ = ["TUNE_OBJECTIVES", "check_tune_section", "validate_tune"]

TUNE_OBJECTIVES = ("robustness", "accuracy")


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate_tune(t: DictConfig) -> None:
    _check(t.n_trials >= 1, "tune.n_trials", f"must be >= 1, got {t.n_trials}")
    _check(t.population_size >= 2, "tune.population_size", f"must be >= 2, got {t.population_size}")
    _check(t.max_concurrent >= 1, "tune.max_concurrent", f"must be >= 1, got {t.max_concurrent}")
    _check(t.objectives in TUNE_OBJECTIVES, "tune.objectives",
           f"unknown value '{t.objectives}' (choose from {', '.join(TUNE_OBJECTIVES)})")
    _check(0 <= t.max_accuracy_drop <= 1, "tune.max_accuracy_drop", f"must be in [0, 1], got {t.max_accuracy_drop}")
    if t.baseline_accuracy is not None:
        _check(0 <= t.baseline_accuracy <= 1, "tune.baseline_accuracy", f"must be in [0, 1], got {t.baseline_accuracy}")
    _check(t.cpus_per_trial > 0, "tune.cpus_per_trial", f"must be > 0, got {t.cpus_per_trial}")
    _check(t.gpus_per_trial >= 0, "tune.gpus_per_trial", f"must be >= 0, got {t.gpus_per_trial}")
    _check(t.max_failures >= 0, "tune.max_failures", f"must be >= 0, got {t.max_failures}")
    if t.selection is not None:
        _check(t.selection >= 1, "tune.selection", f"must be >= 1 (validation images per trial) or null, got {t.selection}")


def check_tune_section(cfg: DictConfig) -> None:
    """:func:`validate_tune` on a whole run config (the form :func:`fedrobust.config.register_check` takes)."""
    validate_tune(cfg.tune)


register_check("tune", check_tune_section)
