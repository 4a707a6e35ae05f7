"""Hydra configuration groups (YAML) for fedrobust; each section's schema lives next to its code
(see :mod:`fedrobust.config`). :data:`CONF_DIR` is where they are, for every reader."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent
