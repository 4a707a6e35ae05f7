"""fedrobust: robust federated ensembles.

Flower clients train ensemble members on their own shards; the server
assembles them into an :class:`Ensemble` (by default a :class:`LogitAverageEnsemble`).

The names below are imported on first use (PEP 562), so that the commands
that need no torch (``fedrobust deploy``, ``--help``, a config error) answer
in about half a second instead of waiting the three seconds importing torch takes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .ensemble import Ensemble, InvalidUpdateError, LogitAverageEnsemble
    from .runs.members import load_ensemble
    from .training import train_member

__all__ = ["Ensemble", "InvalidUpdateError", "LogitAverageEnsemble", "load_ensemble", "train_member"]
__version__ = "0.1.0"

_HOME = {"Ensemble": ".ensemble", "InvalidUpdateError": ".ensemble", "LogitAverageEnsemble": ".ensemble", "load_ensemble": ".runs.members",
         "train_member": ".training"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'fedrobust' has no attribute '{name}'")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
