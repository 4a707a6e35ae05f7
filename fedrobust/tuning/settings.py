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

__all__ = ["SAMPLERS", "SCHEDULERS", "TUNE_OBJECTIVES", "FidelityConfig", "RayConfig", "TuneConfig", "check_tune",
           "paper_space", "rung_epochs", "rung_images"]

TUNE_OBJECTIVES = ("robustness", "accuracy")
# nsga2: the paper's; tpe: Optuna's multi-objective TPE; gp: Optuna's Gaussian-process sampler (log expected
# hypervolume improvement, constrained). Each reads the accuracy constraint a trial records.
SAMPLERS = ("nsga2", "tpe", "gp")
# none: every trial trains and is attacked at the full budget; moasha: asynchronous successive halving with
# non-dominated sorting (MO-ASHA), trials start at a low budget and the best are promoted
SCHEDULERS = ("none", "moasha")


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
class FidelityConfig:
    """The budgets of a multi-fidelity study (``tune.scheduler=moasha``): rung k trains to epoch b_k of the
    schedule and attacks n_k validation images; the top rung is the full budget (train.epochs, the selection)."""

    rungs: int = 3  # budgets, the full one included
    reduction_factor: int = 3  # eta: each rung's budget is eta times the one below; 1 in eta is promoted
    min_epochs: int | None = None  # the lowest rung's epochs; None: train.epochs / eta^(rungs - 1), at least 1
    min_images: int = 50  # the fewest validation images a rung attacks (never more than the selection)


def rung_epochs(epochs: int, rounds: int, rungs: int, eta: int, min_epochs: int | None = None) -> list[int]:
    """Each rung's epochs, lowest first, the last ``epochs``: a geometric series (ratio ``eta``, or from
    ``min_epochs``). With several rounds each budget is moved up to a round's end, where the members'
    peers are exchanged, so that a promoted trial resumes at a round's start; equal budgets merge."""
    low = min_epochs if min_epochs is not None else max(1, round(epochs / eta ** (rungs - 1)))
    budgets = [round(low * (epochs / low) ** (k / (rungs - 1))) for k in range(rungs)]
    if rounds > 1:
        q, r = divmod(epochs, rounds)
        ends = [sum(q + (1 if i < r else 0) for i in range(j + 1)) for j in range(rounds)]
        budgets = [min(e for e in ends if e >= b) for b in budgets]
    out: list[int] = []
    for b in [*budgets[:-1], epochs]:
        if b >= 1 and (not out or b > out[-1]):
            out.append(b)
    return out


def rung_images(selection: int, rungs: int, eta: int, min_images: int) -> list[int]:
    """Validation images each rung attacks, lowest first: the selection at the top rung, ``eta`` times
    fewer per rung below, never fewer than ``min_images`` (nor more than the selection)."""
    return [min(selection, max(min_images, round(selection / eta ** (rungs - 1 - k)))) for k in range(rungs)]


@dataclass
class TuneConfig:
    n_trials: int = 100  # completed trials the study ends with
    sampler: str = "nsga2"  # nsga2 (the paper) | tpe (multi-objective TPE) | gp (Gaussian process, log EHVI)
    # none: every trial at the full budget | moasha: trials start at tune.fidelity's lowest budget, and the
    # best 1 in eta at each rung (non-dominated sorting) go on to the next; n_trials counts configurations
    scheduler: str = "none"
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)  # the budgets of tune.scheduler=moasha
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
    check(t.scheduler in SCHEDULERS, "tune.scheduler",
          f"unknown value '{t.scheduler}' (choose from {', '.join(SCHEDULERS)})")
    f = t.fidelity
    check(f.rungs >= 2, "tune.fidelity.rungs", f"must be >= 2, got {f.rungs}")
    check(f.reduction_factor >= 2, "tune.fidelity.reduction_factor", f"must be >= 2, got {f.reduction_factor}")
    check(f.min_images >= 1, "tune.fidelity.min_images", f"must be >= 1, got {f.min_images}")
    if f.min_epochs is not None:
        check(1 <= f.min_epochs < cfg.train.epochs, "tune.fidelity.min_epochs",
              f"must be >= 1 and below train.epochs ({cfg.train.epochs}), got {f.min_epochs}")
    if t.scheduler == "moasha":
        check(cfg.engine.name == "inline", "tune.scheduler",
              "moasha resumes promoted trials from their checkpoints, which engine=inline writes; "
              f"drop engine={cfg.engine.name} from the command")
        budgets = rung_epochs(cfg.train.epochs, cfg.train.rounds, f.rungs, f.reduction_factor, f.min_epochs)
        check(len(budgets) == f.rungs, "tune.fidelity.rungs",
              f"{f.rungs} rungs need {f.rungs} distinct budgets; train.epochs={cfg.train.epochs} over "
              f"{cfg.train.rounds} round(s) gives {budgets}: fewer rungs, a smaller reduction_factor or more epochs")
