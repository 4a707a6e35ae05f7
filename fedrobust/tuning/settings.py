"""The ``tune`` and ``ray`` config sections: a study's trials, its sampler (NSGA-II, as the paper, or a
sample-efficient one), its constraint, its search space, and the Ray instance its trials run on.

Their schemas, defaults and checks, next to the tuner that reads them. This
module imports nothing of the tuner (the package names its contents lazily),
so the whole config's schema loads without Ray or Optuna.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from ..errors import check

__all__ = ["SAMPLERS", "TUNE_OBJECTIVES", "RayConfig", "TuneConfig", "check_tune", "paper_space"]

TUNE_OBJECTIVES = ("robustness", "accuracy")
# nsga2: the paper's; tpe: Optuna's multi-objective TPE; gp: Optuna's Gaussian-process sampler (log expected
# hypervolume improvement, constrained). Each reads the accuracy constraint a trial records.
SAMPLERS = ("nsga2", "tpe", "gp")


def paper_space() -> dict[str, Any]:
    """The main paper's search space (Table 1)."""
    return {
        "optimizer": {
            "lr": {"type": "float", "low": 1e-4, "high": 0.4, "log": True},
            "momentum": {"type": "float", "low": 0.8, "high": 0.99},
            "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
        },
        "train": {"batch_size": {"type": "categorical", "choices": [32, 64, 128, 256, 512, 1024, 2048]}},
    }


@dataclass
class TuneConfig:
    n_trials: int = 100  # completed trials the study ends with
    sampler: str = "nsga2"  # nsga2 (the paper) | tpe (multi-objective TPE) | gp (Gaussian process, log EHVI)
    # NSGA-II's population (the paper: 20 x 5 generations); tpe and gp: their random start-up trials
    population_size: int = 20
    max_concurrent: int = 2  # trials running at once
    seed: int = 0  # the sampler's seed
    objectives: str = "robustness"  # robustness: max (RA_T, RA_Q) | accuracy: max (val accuracy, min(RA_T, RA_Q))
    max_accuracy_drop: float = 0.05  # constraint: CA >= baseline CA - drop
    baseline_accuracy: float | None = None  # None: train the centralized baseline once per study
    storage: str = ""  # "" = sqlite:///<study_dir>/study.db, or any Optuna RDB URL
    study_name: str = "fedrobust"  # the Optuna study's name in its storage
    cpus_per_trial: float = 1.0  # Ray CPUs each trial holds
    gpus_per_trial: float = 0.0  # Ray GPUs each trial holds (fractions share a GPU)
    max_failures: int = 10  # stop when this many trials raised (not counting re-queued or diverged ones)
    # validation images each trial is attacked on, drawn with attack.sample_seed from the union of the
    # nodes' validation splits; None: attack.num_samples (the whole union if it is smaller)
    selection: int | None = None
    # config key -> {type: float|int|categorical, low, high, log, choices}; nested by group
    space: dict[str, Any] = field(default_factory=paper_space)


@dataclass
class RayConfig:
    address: str | None = None  # None: a local Ray instance; "auto" or ray://host:port for a cluster


def check_tune(cfg: DictConfig) -> None:
    t = cfg.tune
    check(t.n_trials >= 1, "tune.n_trials", f"must be >= 1, got {t.n_trials}")
    check(t.sampler in SAMPLERS, "tune.sampler", f"unknown value '{t.sampler}' (choose from {', '.join(SAMPLERS)})")
    check(t.population_size >= 2, "tune.population_size", f"must be >= 2, got {t.population_size}")
    check(t.max_concurrent >= 1, "tune.max_concurrent", f"must be >= 1, got {t.max_concurrent}")
    check(t.objectives in TUNE_OBJECTIVES, "tune.objectives",
          f"unknown value '{t.objectives}' (choose from {', '.join(TUNE_OBJECTIVES)})")
    check(0 <= t.max_accuracy_drop <= 1, "tune.max_accuracy_drop", f"must be in [0, 1], got {t.max_accuracy_drop}")
    if t.baseline_accuracy is not None:
        check(0 <= t.baseline_accuracy <= 1, "tune.baseline_accuracy", f"must be in [0, 1], got {t.baseline_accuracy}")
    check(t.cpus_per_trial > 0, "tune.cpus_per_trial", f"must be > 0, got {t.cpus_per_trial}")
    check(t.gpus_per_trial >= 0, "tune.gpus_per_trial", f"must be >= 0, got {t.gpus_per_trial}")
    check(t.max_failures >= 0, "tune.max_failures", f"must be >= 0, got {t.max_failures}")
    if t.selection is not None:
        check(t.selection >= 1, "tune.selection", f"must be >= 1 (validation images per trial) or null, got {t.selection}")
