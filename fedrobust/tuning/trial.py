"""One trial: train an ensemble with some config keys changed, attack it, return its scores.

:func:`trial_task` runs in a Ray worker on any node of the cluster: it works
in that node's scratch space and streams its run directory back to the
tuner (:mod:`fedrobust.tuning.remote`). :func:`execute` is the trial itself,
usable in-process.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..atomic import write_json
from ..stats import interval_of

__all__ = ["execute", "trial_task", "load_scores", "apply_values"]

log = logging.getLogger("fedrobust")


def apply_values(cfg, values: dict[str, Any]):
    """The config with ``values`` (config key -> value) set, validated.

    A searched ``model.name`` comes with its ``model.genotype`` (:meth:`.space.SearchSpace.config_values`),
    so that a trial on another machine reads no file; without it, the file is read here."""
    from ..models.settings import resolve_genotype
    from ..validation import validate_all as validate  # every section, also in a fresh Ray worker

    cfg = OmegaConf.merge(cfg, {})  # a copy
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    if "model.name" in values or "model.genotype" in values:
        resolve_genotype(cfg, reread="model.name" in values and "model.genotype" not in values)
    validate(cfg)
    return cfg


def load_scores(run_dir: Path) -> dict[str, Any] | None:
    """A finished trial's scores from its ``results.json``, or None if it has not been evaluated."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    ens = results.get("ensemble", {})
    ra = ens.get("robust_accuracy")
    if not ra or "val_accuracy" not in ens:
        return None
    members = results.get("members", [])
    images = results.get("images", {})
    n_eval = results.get("evaluation", {}).get("num_samples")
    return {
        "ca": ens["clean_accuracy"],  # a study's trial: on the nodes' validation splits (results.json's images)
        "val_accuracy": ens["val_accuracy"],
        "ra_t": ra["transfer"],
        "ra_q": ra["query"],
        "best_epoch": sum(m.get("best_epoch", 0) for m in members) / max(len(members), 1) + 1,
        "seconds": results.get("trial_seconds"),
        "fidelity": results.get("fidelity"),  # a multi-fidelity study's rung, else None
        # 95% Wilson intervals, over the images each figure was measured on
        "intervals": {
            "ca": interval_of(ens["clean_accuracy"], images.get("clean_accuracy", {}).get("num_images")),
            "val_accuracy": interval_of(ens["val_accuracy"], images.get("val_accuracy", {}).get("num_images")),
            "ra_t": interval_of(ra["transfer"], n_eval), "ra_q": interval_of(ra["query"], n_eval)},
    }


def _val_accuracy(cfg, run_dir: Path, data, results: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Ensemble accuracy on the union of the nodes' validation splits (never the test set), and those images.

    A run scored on them (``attack.split=validation``, a study's trial) already has it as its clean accuracy.
    """
    clean = results.get("images", {}).get("clean_accuracy", {})
    if clean.get("split") == "validation":
        return results["ensemble"]["clean_accuracy"], clean

    from ..runs.images import held_out_images
    from ..runs.members import load_ensemble
    from ..training import evaluate_model, resolve_device

    images = held_out_images(cfg, data, "validation")
    x, y = images.tensors(data)
    _, acc = evaluate_model(load_ensemble(run_dir, resolve_device(cfg.train.device), cfg), x, y)
    return acc, images.describe()


def _simulate_in_child(cfg, run_path: Path, threads: int) -> None:
    """Flower's simulation engine with a private Ray instance of this trial's CPUs, never the tuner's.

    Inside a Ray task the simulation would ask the tuner's cluster for its
    clients' CPUs, which the running trials hold; a private instance sized to
    this trial's CPUs avoids that deadlock. It runs in a child process of its
    own session (:func:`fedrobust.engines.run_simulation`): a cancelled or
    failed trial stops it and its Ray with one ``killpg``, and its pid is kept
    beside the trial's scratch folder meanwhile (:mod:`.child`).
    """
    from ..engines import run_simulation
    from .child import PID_FILE

    cfg = OmegaConf.merge(cfg, {"engine": {"ray_address": None}})
    run_simulation(cfg, run_path, num_cpus=max(1, int(threads)), pid_file=run_path.parent / PID_FILE)


def execute(cfg_yaml: str, values: dict[str, Any], run_dir: str, threads: int = 1,
            artefacts: dict[str, Any] | None = None, fidelity: dict[str, int] | None = None,
            resume: bytes | None = None) -> dict[str, Any]:
    """Train and evaluate one configuration in a new ``run_dir``; return its scores.

    The run is scored on the images ``attack.split`` names: a study's trials
    (``validation``) classify and attack no test image; sweeps (``test``)
    report test figures.

    With ``fidelity`` (a multi-fidelity study's rung: ``epochs``, ``images``) the trial trains to that
    epoch of its schedule, from ``resume`` (the checkpoint of its last rung, :mod:`fedrobust.resume`) if
    given, attacks that many images, and saves its own checkpoint below the full budget.

    torch runs on ``threads`` threads for the trial, and on as many as before once it returns (a
    trial run in the caller's process must not change the caller's thread count).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        return _execute(cfg_yaml, values, run_dir, threads, artefacts, fidelity, resume)
    finally:
        torch.set_num_threads(before)


def _execute(cfg_yaml: str, values: dict[str, Any], run_dir: str, threads: int,
             artefacts: dict[str, Any] | None, fidelity: dict[str, int] | None = None,
             resume: bytes | None = None) -> dict[str, Any]:
    """:func:`execute`'s body, at the trial's thread count.

    ``artefacts`` (``{"names": [...], "ref": [object ref]}``) are the tuner's cache files (zoo,
    transfer examples); the ones this node's cache lacks are written there before evaluating.
    """
    from ..data import dataset_of
    from ..runs.cache import cache_root
    from ..evaluation.evaluate import evaluate_run
    from ..run import finalize_run, prepare_run_dir
    from ..node import host_identity
    from .remote import install_files

    from ..plugins import load_plugins

    load_plugins()  # a plug-in strategy or attack stage named by the trial's config (this is a fresh worker)
    cfg = apply_values(OmegaConf.create(cfg_yaml), values)
    cfg.train.progress = False
    stage = None
    if fidelity is not None:
        from ..resume import TrainingStage, load_stage, training_digest

        cfg.attack.num_samples = int(fidelity["images"])
        if resume is None:
            stage = TrainingStage(stop=int(fidelity["epochs"]), digest=training_digest(cfg))
        else:
            stage = load_stage(io.BytesIO(resume), cfg).resumed_to(int(fidelity["epochs"]))
    t0 = time.perf_counter()
    run_path = prepare_run_dir(cfg, str(run_dir))
    where = host_identity()
    log.info("trial on %s", ", ".join(f"{k} {v}" for k, v in where.items()))
    if artefacts:
        root = cache_root(cfg.attack.cache_dir)
        written = install_files(root, artefacts["names"], artefacts.get("ref"))
        if written:
            log.info("received %d cache file(s) from the tuner (surrogate zoo, transfer examples) into %s",
                     len(written), root)
    data = dataset_of(cfg)
    if cfg.engine.name == "inline":
        from ..engines import run_inline

        missing: dict = {}
        finalize_run(cfg, run_path, run_inline(cfg, missing, stage), missing=missing or None, data=data)
        if stage is not None and stage.stop < cfg.train.epochs:
            from ..resume import CHECKPOINT, save_stage

            save_stage(run_path / CHECKPOINT, stage)  # what a promotion to the next rung resumes
    elif stage is not None:
        raise ValueError("a multi-fidelity trial trains inline (engine=inline)")
    else:
        _simulate_in_child(cfg, run_path, threads)
    evaluate_run(run_path, cfg, data)
    results_path = run_path / "results.json"
    results = json.loads(results_path.read_text())
    val_acc, val_images = _val_accuracy(cfg, run_path, data, results)
    results["ensemble"]["val_accuracy"] = val_acc
    results.setdefault("images", {})["val_accuracy"] = val_images
    results["trial_seconds"] = round(time.perf_counter() - t0, 2)
    results["trial_values"] = values
    results["trial_node"] = where
    if fidelity is not None:
        results["fidelity"] = dict(fidelity) | {"resumed_from_epoch": stage.start}
    write_json(results_path, results)  # the trial counts as done only once this file is whole
    scores = load_scores(run_path)
    assert scores is not None
    return scores


def trial_task(cfg_yaml: str, values: dict[str, Any], name: str, threads: int = 1,
               artefacts: dict[str, Any] | None = None, fidelity: dict[str, int] | None = None,
               resume: bytes | None = None) -> Iterator[dict[str, Any] | bytes]:
    """A trial as a Ray streaming generator: where it runs, its scores, then its run directory.

    Yields ``{"event": "start", host, node_ip, node_id, work_dir}`` as soon as it
    starts, ``{"event": "result", "scores": ...}`` when evaluated, then the run
    directory as :func:`remote.send_dir` items. It works in this node's scratch
    space, removed afterwards; the tuner writes what it receives.
    """
    from ..node import host_identity
    from .child import cleanup_work_dir
    from .remote import scratch_root, send_dir

    work = scratch_root() / f"{name}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    try:
        yield {"event": "start", **host_identity(), "work_dir": str(work)}
        scores = execute(cfg_yaml, values, str(work / name), threads, artefacts, fidelity, resume)
        yield {"event": "result", "scores": scores}
        yield from send_dir(work / name)
    finally:  # also on a cancel (KeyboardInterrupt) or an error: the child's group is stopped before
        cleanup_work_dir(work)
