"""A study's Pareto front, evaluated once on the test sample.

A study selects on validation images only: its trials run with
``attack.split=validation`` (CA on the union of the nodes' validation
splits, RA_T and RA_Q on ``tune.selection`` images drawn from it), and its
baseline is scored on its own validation split. No test image is classified
or attacked while the trials run. When the study ends, and on
``fedrobust report``, each trial of the feasible front is evaluated once on
the test sample (``attack.num_samples`` test images, the study's attack
settings) into ``trials/trial_NNNN/test/``, next to its validation figures.
That evaluation is kept: a second report reads it back (the surrogate zoo
and the transfer examples come from the content-addressed cache as well).
"""

from __future__ import annotations

import json
import os
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..errors import one_line
from ..stats import interval_of

__all__ = ["TEST_DIR", "evaluate_front", "images_measured", "load_study_config", "test_scores", "trial_dir"]

log = logging.getLogger("fedrobust")

TEST_DIR = "test"  # a trial's evaluation on the test sample, under its run directory


def trial_dir(study_dir: Path, number: int, recorded: str | None = None) -> Path:
    """A trial's run directory: under ``study_dir/trials`` (where the tuner writes it; a study moved since
    still finds it), else as recorded. A promoted trial's is its top rung's (``trial_NNNN_rK``)."""
    here = Path(study_dir) / "trials" / (Path(recorded).name if recorded else f"trial_{number:04d}")
    return here if here.is_dir() or not recorded else Path(recorded)


def _read(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def test_scores(run_dir: Path) -> dict[str, Any] | None:
    """A trial's figures on the test sample (``ca_test``, ``ra_t_test``, ``ra_q_test``), or None if not evaluated."""
    results = _read(Path(run_dir) / TEST_DIR / "results.json")
    if results is None or results.get("evaluation", {}).get("split") != "test":
        return None
    ens = results.get("ensemble", {})
    ra = ens.get("robust_accuracy")
    if not ra:
        return None
    n_eval = results.get("evaluation", {}).get("num_samples")
    n_ca = results.get("images", {}).get("clean_accuracy", {}).get("num_images")
    out = {"ca_test": ens["clean_accuracy"], "ra_t_test": ra["transfer"], "ra_q_test": ra["query"]}
    for key, n in (("ca_test", n_ca), ("ra_t_test", n_eval), ("ra_q_test", n_eval)):
        ci = interval_of(out[key], n)
        out[f"{key}_low"], out[f"{key}_high"] = ci if ci else (None, None)
    return out


def images_measured(run_dir: Path) -> dict[str, str]:
    """What a trial's figures were measured on, in words: ``ca``, ``ra`` (validation) and ``ca_test``, ``ra_test``."""
    out = {}
    for sub, suffix in (("", ""), (TEST_DIR, "_test")):
        results = _read(Path(run_dir) / sub / "results.json") or {}
        images = results.get("images", {})
        if "clean_accuracy" in images:
            out[f"ca{suffix}"] = images["clean_accuracy"]["text"]
        if "evaluation" in images:
            out[f"ra{suffix}"] = images["evaluation"]["text"]
    return out


def load_study_config(study_dir: Path) -> DictConfig:
    """The study's configuration (``config.yaml``, written when the study started), typed and validated."""
    from ..errors import ConfigError
    from ..config import structured_base
    from ..validation import validate_all as validate

    path = Path(study_dir) / "config.yaml"
    try:
        saved = OmegaConf.load(path)
        cfg = OmegaConf.merge(structured_base(saved.get("strategy", {}).get("name", "plain")), saved)
        validate(cfg)
    except FileNotFoundError:
        raise ConfigError(f"path: {path} is missing; it is written when the study starts") from None
    except ConfigError:
        raise
    except Exception as exc:  # OmegaConf's own errors, a damaged file
        raise ConfigError(f"path: {path} is not a study config ({one_line(exc)[:200]})") from None
    return cfg


def _test_config(run_dir: Path, study_cfg: DictConfig) -> DictConfig:
    """The trial's own config (its model and hyperparameters) with the study's test sample and attack settings."""
    from ..config import structured_base
    from ..validation import validate_all as validate

    saved = OmegaConf.load(run_dir / "config.yaml")
    cfg = OmegaConf.merge(structured_base(saved.get("strategy", {}).get("name", "plain")), saved)
    # the trial's cache_dir: the tuner made it absolute, so a report run from elsewhere finds the same cache
    cfg.attack = OmegaConf.merge(cfg.attack, study_cfg.attack, {"split": "test", "cache_dir": cfg.attack.cache_dir})
    cfg.train.progress = False
    validate(cfg)
    return cfg


def front_threads(tune: DictConfig) -> int:
    """Threads for the front's test evaluation: the CPUs the study's trials held (``max_concurrent`` x
    ``cpus_per_trial``), all free once the last trial ended, at most this machine's. On bench_tuning's digits
    front this took the evaluation from 33.5 s (1 thread) to 20.6 s (2), with the same figures; the order of a
    float sum may differ with the thread count, so a figure can move by an image between machines."""
    held = int(tune.cpus_per_trial * tune.max_concurrent)
    return max(1, min(held, os.cpu_count() or 1))


def evaluate_front(study_dir: Path, study_cfg: DictConfig, front: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Evaluate each front trial (a row with ``number`` and ``run_dir``) on the test sample, once; its test figures
    by trial number. A trial whose run directory is gone is left out, with a warning."""
    from ..data import dataset_of
    from ..evaluation.evaluate import evaluate_run

    out: dict[int, dict[str, Any]] = {}
    todo = []
    for row in front:
        run_dir = trial_dir(study_dir, row["number"], row.get("run_dir"))
        if not (run_dir / "config.yaml").is_file() or not any((run_dir / "members").glob("member_*.pt")):
            log.warning("trial %d: no run directory with members at %s; not evaluated on the test sample",
                        row["number"], run_dir)
            continue
        todo.append((row["number"], run_dir))
    if not todo:
        return out
    log.info("evaluating the front's %d trial(s) once on the test sample (%d test images at most)", len(todo),
             study_cfg.attack.num_samples)
    import torch

    data = dataset_of(study_cfg)
    before = torch.get_num_threads()
    torch.set_num_threads(front_threads(study_cfg.tune))
    try:
        for number, run_dir in todo:
            cfg = _test_config(run_dir, study_cfg)
            evaluate_run(run_dir, cfg, data, into=TEST_DIR, reuse=True)
            scores = test_scores(run_dir)
            if scores is not None:
                out[number] = scores
                log.info("trial %d on the test sample: CA %.4f, RA_T %.4f, RA_Q %.4f", number, scores["ca_test"],
                         scores["ra_t_test"], scores["ra_q_test"])
    finally:
        torch.set_num_threads(before)
    return out
