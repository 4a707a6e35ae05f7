"""Attack-loss search, AutoLoss-AR (paper 004): ``fedrobust search-loss RUN_DIR``.

:mod:`.gp` (DEAP's genetic program over :mod:`fedrobust.attacks.expression`
trees), :mod:`.fitness` (robust accuracy after PGD-10, cached by simplified
expression), :mod:`.parallel` (fitness on Ray), :mod:`.search` (the resumable
driver and its outputs), :mod:`.heldout` (the found losses on test images).
"""

from .search import run_search

__all__ = ["run_search"]
