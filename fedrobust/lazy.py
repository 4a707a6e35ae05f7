"""Packages that name their contents on first use (PEP 562).

A package whose ``__init__`` imports its modules makes importing any one of
them import all: ``fedrobust.tuning.settings`` (a dataclass) would bring the
tuner, Ray and Optuna; ``fedrobust.models.settings`` would bring torch. Such a
package's ``__init__`` instead declares where each public name lives;
``from fedrobust.models import build_model`` imports ``fedrobust.models.zoo``
then, and only then. ``tests/test_layering.py`` sees such an ``__init__`` as
importing nothing, which is what it does until a name is asked for.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(package: str, homes: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``, whose public names live in the (relative) modules
    ``homes`` gives: ``{"build_model": ".zoo"}``. A name is imported on first use and kept."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(home, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(homes))

    return __getattr__, __dir__
