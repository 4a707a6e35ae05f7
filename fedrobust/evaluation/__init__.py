"""Evaluation of a run: the attacks of :mod:`fedrobust.attacks` applied to a run's ensemble, as stages.

:func:`evaluate_run` is a short driver over the stages registered in
:mod:`.stages` (surrogate zoo, transfer, query and white-box attacks, TSR,
smoothness); :mod:`.surrogates` trains the zoo and :mod:`.cache` keeps heavy
artefacts by content.
"""

from .evaluate import evaluate_run, evaluation_sample, prepare_transfer_artefacts, read_results
from .stages import REGISTRY, Stage, build_stages, register

__all__ = ["REGISTRY", "Stage", "build_stages", "evaluate_run", "evaluation_sample", "prepare_transfer_artefacts",
           "read_results", "register"]
