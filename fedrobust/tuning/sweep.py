"""Resumable sweeps: a list of cells (Hydra overrides each), run as Ray tasks, a cell's run kept once done.

Used by ``simulations/`` for the RQ1/RQ2 one-at-a-time grids and the
ablations. A cell whose run directory holds an evaluated ``results.json``
is skipped, so running a sweep again finishes what an interrupted run left.
``cells.csv`` collects every cell's hyperparameters and scores for
``fedrobust report``.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..validation import load_config  # every section checked, attack and tune included
from ..atomic import atomic_open, write_json
from ..interrupt import deferred
from ..progress import interactive
from ..redact import redacted
from ..progress import progress as progress_bar
from .pool import EventLog, TrialPool
from .study import pin_cache_dir, share_artefacts, study_lock
from .trial import load_scores, trial_task

__all__ = ["Cell", "run_sweep", "split_overrides", "CELL_COLUMNS", "SWEEP_DEFAULTS"]

log = logging.getLogger("fedrobust")

CELL_COLUMNS = ["cell", "param", "value", "deployment", "num_nodes", "alpha", "seed", "lr", "momentum", "weight_decay",
                "batch_size", "ca", "val_accuracy", "ra_t", "ra_q", "best_epoch", "status"]


# Sweep cells train inline and measure RA_T and RA_Q only, unless later overrides say otherwise.
SWEEP_DEFAULTS = ["engine=inline", "attack.whitebox=[]", "attack.tsr=false", "attack.hessian_samples=0"]


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """A script's command line as (its own options, Hydra overrides ``key=value`` for every run)."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return [a for a in argv if a not in overrides], overrides


@dataclass
class Cell:
    name: str  # also the run directory's name under cells/
    overrides: list[str]
    param: str  # the swept key (its short name), e.g. "lr"
    value: Any
    meta: dict[str, Any] = field(default_factory=dict)


def _row(cell: Cell, cfg, scores: dict[str, Any] | None) -> dict[str, Any]:
    row = {"cell": cell.name, "param": cell.param, "value": cell.value, "deployment": cfg.deployment.name,
           "num_nodes": cfg.deployment.num_nodes, "alpha": cfg.deployment.alpha, "seed": cfg.train.seed,
           "lr": cfg.optimizer.lr, "momentum": cfg.optimizer.momentum, "weight_decay": cfg.optimizer.weight_decay,
           "batch_size": cfg.train.batch_size, "status": "done" if scores else "missing"}
    if scores:
        row.update({k: scores[k] for k in ("ca", "val_accuracy", "ra_t", "ra_q", "best_epoch")})
    return row


def _write(sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_open(sweep_dir / "cells.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CELL_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: "" if r.get(c) is None else r.get(c) for c in CELL_COLUMNS})


class _Cells:
    """A sweep as the runner's source (:class:`.runner.TrialSource`): its cells not done yet, in order."""

    def __init__(self, cells, configs, todo, sweep_dir, scores, bar) -> None:
        self.cells, self.configs, self.sweep_dir, self.scores, self.bar = cells, configs, sweep_dir, scores, bar
        self.queue = list(todo)
        self.yaml = {i: OmegaConf.to_yaml(redacted(configs[i])) for i in todo}  # no URL password reaches a cell
        self.runner = None

    def finished(self) -> bool:
        return not self.queue

    def next(self, running: int):
        from .runner import Launch

        if not self.queue:
            return None
        i = self.queue.pop(0)
        cell = self.cells[i]
        return Launch(i, cell.name, self.sweep_dir / "cells" / cell.name, {}, self.yaml[i], f"cell {cell.name}")

    def started(self, launch, where) -> None:
        pass

    def _written(self) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(f"running {self.runner.running if self.runner else 0}", refresh=interactive())
        _write(self.sweep_dir, [_row(c, cfg, self.scores[c.name]) for c, cfg in zip(self.cells, self.configs)])

    def completed(self, launch, scores, where) -> None:
        self.scores[launch.name] = scores
        log.info("cell %s: CA %.4f RA_T %.4f RA_Q %.4f", launch.name, scores["ca"], scores["ra_t"], scores["ra_q"])
        self._written()

    def failed(self, launch, reason, kind, where) -> None:
        if kind != "lost":  # a lost cell runs again; a failed or diverged one stays missing in cells.csv
            self._written()

    def retry(self, launch) -> None:
        self.queue.append(launch.key)

    def cancelled(self, launch) -> None:
        """Nothing to record: a cell not done is run by the next run of the sweep."""


def run_sweep(name: str, cells: list[Cell], sweep_dir: str | Path, *, max_concurrent: int = 2, cpus_per_cell: float = 1.0,
              gpus_per_cell: float = 0.0, address: str | None = None, progress: bool = True, max_failures: int = 3,
              task: Callable = trial_task) -> list[dict[str, Any]]:
    """Run every cell not done yet; return one row per cell (in order).

    A cell that fails or is lost with its worker counts towards ``max_failures``; one more stops the
    sweep with :class:`.runner.TooManyFailures`, naming the cell (a lost cell runs again until then,
    a failed one is left missing). ``task`` is the Ray task a cell runs (default: train and evaluate it).
    """
    from .runner import TrialRunner

    sweep_dir = Path(sweep_dir).expanduser().resolve()
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise ValueError("cell names must be unique")
    if max_failures < 0:
        raise ValueError(f"max_failures must be >= 0, got {max_failures}")
    from ..plugins import load_plugins

    load_plugins()  # cells may name a plug-in strategy or attack stage
    configs = [load_config(c.overrides) for c in cells]  # every cell's config is checked before anything runs
    with study_lock(sweep_dir):
        (sweep_dir / "cells").mkdir(exist_ok=True)
        write_json(sweep_dir / "sweep.json", {"kind": "sweep", "name": name, "cells": len(cells)})
        scores: dict[str, dict | None] = {c.name: load_scores(sweep_dir / "cells" / c.name) for c in cells}
        todo = [i for i, c in enumerate(cells) if scores[c.name] is None]
        log.info("sweep %s: %d cell(s), %d done, %d to run", name, len(cells), len(cells) - len(todo), len(todo))
        if todo:
            for cfg in configs:
                pin_cache_dir(cfg)
                cfg.evaluate = True
            bar = progress_bar(total=len(cells), initial=len(cells) - len(todo), desc=name, enabled=progress)
            source = _Cells(cells, configs, todo, sweep_dir, scores, bar)
            try:
                pool = None
                try:
                    with deferred():  # the pool is held (and closed below) before a signal is taken
                        pool = TrialPool(task, address=address, cpus=cpus_per_cell, gpus=gpus_per_cell,
                                         max_concurrent=max_concurrent)
                    pool.start()  # Ray: a signal meanwhile is taken at once
                    artefacts = share_artefacts(pool, configs[todo[0]])
                    runner = TrialRunner(pool, source, EventLog(sweep_dir / "executions.jsonl"), max_failures=max_failures,
                                         failures_key="max_failures", threads=max(1, int(cpus_per_cell)),
                                         artefacts=artefacts)
                    source.runner = runner
                    runner.run()  # it closes the pool however it ends
                finally:
                    if pool is not None:
                        pool.close()  # a no-op once closed
            finally:
                bar.close()
                _write(sweep_dir, [_row(c, cfg, scores[c.name]) for c, cfg in zip(cells, configs)])
        rows = [_row(c, cfg, scores[c.name]) for c, cfg in zip(cells, configs)]
        _write(sweep_dir, rows)
    missing = sum(r["status"] != "done" for r in rows)
    log.info("sweep %s: %d/%d cell(s) done; %s", name, len(rows) - missing, len(rows), sweep_dir / "cells.csv")
    return rows
