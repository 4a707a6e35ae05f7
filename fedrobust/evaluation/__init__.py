"""Evaluation of a run: the attacks of :mod:`fedrobust.attacks` applied to a run's ensemble, as stages.

:func:`evaluate_run` is a short driver over the stages registered in
:mod:`.stages` (surrogate zoo, transfer, query and white-box attacks, TSR,
smoothness); :mod:`.surrogates` trains the zoo; the ``attack`` config
section is :mod:`.settings` (schema) and :mod:`.checks` (its checks). The
held-out images and content keys it shares with the searches and the tuner
are :mod:`fedrobust.runs`.

The names below are imported on first use (:mod:`fedrobust.lazy`), so that
the config's schema loads without the evaluation code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

if TYPE_CHECKING:
    from .evaluate import evaluate_run, prepare_transfer_artefacts, read_results
    from .stages import REGISTRY, Stage, build_stages, register

__all__ = ["REGISTRY", "Stage", "build_stages", "evaluate_run", "prepare_transfer_artefacts", "read_results",
           "register"]

__getattr__, __dir__ = lazy_names(__name__, {
    **dict.fromkeys(["evaluate_run", "prepare_transfer_artefacts", "read_results"], ".evaluate"),
    **dict.fromkeys(["REGISTRY", "Stage", "build_stages", "register"], ".stages"),
})
