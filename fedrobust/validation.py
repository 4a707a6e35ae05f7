"""The whole config's validation: one entry point for the CLI, the ServerApp, the tuner and sweeps.

:mod:`fedrobust.config` runs each section's own checks; the ``attack``
section's also need the stage and loss registries, so they live with the
evaluation (:mod:`fedrobust.evaluation.checks`). Importing this module
registers them (with :func:`fedrobust.config.register_check`), so that
:func:`load_config`, :func:`validate_all` (and ``fedrobust.config``'s
``load_config``, ``apply_overrides`` and ``validate`` in this process) check
every section before anything runs. A node never imports it: its task is
checked by :func:`fedrobust.task.check_task`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from . import config
from .config import apply_overrides, load_config
from .evaluation.checks import check_attack_section, validate_attack  # importing it registers it

__all__ = ["apply_overrides", "load_config", "validate_all", "validate_attack"]


def validate_all(cfg: DictConfig) -> None:
    """Every check of every section; a :class:`~fedrobust.errors.ConfigError` names the first key at fault."""
    config.validate(cfg, sections=False)
    check_attack_section(cfg)
