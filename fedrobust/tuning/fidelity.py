"""Multi-fidelity studies: MO-ASHA (Schmucker et al. 2021) over the study's trial runner.

With ``tune.scheduler=moasha`` a trial starts at the lowest of
``tune.fidelity.rungs`` budgets: trained to epoch b_0 of its schedule and
attacked on n_0 validation images (:func:`~.settings.rung_epochs`,
:func:`~.settings.rung_images`). Each rung's budget is ``reduction_factor``
(eta) times the one below; the top rung is the full budget. The rule is
asynchronous successive halving with several objectives:

* a trial scored at rung k may go on to rung k+1 once it is among the best
  floor(n_k / eta) of the n_k trials scored at rung k so far;
* "best" is NSGA-II's order: non-dominated sorting, then, inside a front,
  the larger crowding distance first, over the objectives and the validation
  accuracy (with ``tune.objectives=accuracy`` that is one of them already);
* whenever a slot is free the promotion from the highest rung goes first; with
  none due, the sampler proposes a new trial at rung 0.

A promoted trial resumes its own checkpoint (:mod:`fedrobust.resume`): it
trains only the epochs from its last budget to the next, under the same
schedule, so at the top rung it has the members a full-budget trial would.

The accuracy floor (``tune.max_accuracy_drop`` below the baseline) is about
a trained ensemble, and it decides only at the full budget: which trials may
enter the front. Below it, the floor would call nearly every trial
infeasible (on digits, 9 epochs, all 48 trials after their first epoch), and
constrained sorting would then rank them by accuracy alone, never by their
robustness; so a lower rung ranks on accuracy as a third objective instead,
and the sampler is told the rung-0 objectives without the constraint.
:func:`ranked` and :func:`promotions` still take a violation, for callers
that have a floor that means something at their budget.

The sampler (NSGA-II, TPE or GP) is told every trial's rung-0 scores, so its
model sees one fidelity throughout; the higher rungs' scores are the study's
own records (study user attributes ``rung.<trial>.<k>``, in the same Optuna
storage, so a stopped study resumes them too). Only top-rung scores can enter
the Pareto front and the held-out test evaluation.

Why not Syne Tune's MOASHA: its schedulers drive Syne Tune's own tuner and
trial back-ends, and decide while a running trial reports to them (stop or
go on); fedrobust's trials are Ray tasks launched whole by
:class:`~.runner.TrialRunner`, so a promotion is a new launch that resumes a
checkpoint. The rule itself is the few functions below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Ladder", "Scored", "crowding_distance", "nondominated_fronts", "promotions", "ranked", "rung_dir_name",
           "rung_row"]


@dataclass(frozen=True)
class Scored:
    """A trial's result at one rung: its objective values (maximised) and its constraint (<= 0: feasible)."""

    number: int
    values: tuple[float, ...]
    violation: float = 0.0


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def nondominated_fronts(points: Sequence[Sequence[float]]) -> list[list[int]]:
    """Indices of ``points`` by front (all objectives maximised): the first front no point dominates, the
    second dominated only by the first, ... (Deb et al.'s sorting; O(n^2) comparisons, n is small)."""
    n = len(points)
    dominated_by = [0] * n
    dominates: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if _dominates(points[i], points[j]):
                dominates[i].append(j)
                dominated_by[j] += 1
            elif _dominates(points[j], points[i]):
                dominates[j].append(i)
                dominated_by[i] += 1
    fronts, current = [], [i for i in range(n) if dominated_by[i] == 0]
    while current:
        fronts.append(current)
        nxt = []
        for i in current:
            for j in dominates[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    nxt.append(j)
        current = sorted(nxt)
    return fronts


def crowding_distance(points: Sequence[Sequence[float]]) -> list[float]:
    """NSGA-II's crowding distance inside one front: the extremes of each objective are infinite."""
    n = len(points)
    if n <= 2:
        return [math.inf] * n
    dist = [0.0] * n
    for m in range(len(points[0])):
        order = sorted(range(n), key=lambda i: points[i][m])
        lo, hi = points[order[0]][m], points[order[-1]][m]
        dist[order[0]] = dist[order[-1]] = math.inf
        if hi == lo:
            continue
        for a, i, b in zip(order, order[1:], order[2:]):
            dist[i] += (points[b][m] - points[a][m]) / (hi - lo)
    return dist


def ranked(results: Sequence[Scored]) -> list[int]:
    """Trial numbers, best first: feasible ones by front then crowding distance (larger first), then the
    infeasible ones by their violation (smaller first); ties by trial number. The order of ``results`` does not
    matter (equal points share the crowding distance of their place in trial-number order)."""
    results = sorted(results, key=lambda r: r.number)
    feasible = [r for r in results if r.violation <= 0]
    order: list[int] = []
    for front in nondominated_fronts([r.values for r in feasible]):
        crowd = crowding_distance([feasible[i].values for i in front])
        order += [feasible[i].number for _, i in sorted(zip(crowd, front), key=lambda c: (-c[0], feasible[c[1]].number))]
    order += [r.number for r in sorted((r for r in results if r.violation > 0), key=lambda r: (r.violation, r.number))]
    return order


def promotions(rungs: Sequence[Sequence[Scored]], started: Sequence[set[int]], eta: int) -> list[tuple[int, int]]:
    """The promotions due, as (trial number, the rung it goes to), from the highest rung down, best first.

    ``rungs[k]`` are the results at rung k so far; ``started[k]`` the trials that have reached rung k
    (scored, running or failed there): none of them is promoted to it again. A trial is due at rung k + 1
    when it is among the best floor(len(rungs[k]) / eta) of rung k and not in ``started[k + 1]``.
    """
    due = []
    for k in range(len(rungs) - 2, -1, -1):
        top = ranked(rungs[k])[: len(rungs[k]) // eta]
        due += [(number, k + 1) for number in top if number not in started[k + 1]]
    return due


def rung_row(number: int, rung: int, record: dict[str, Any]) -> dict[str, Any]:
    """A trials.csv row of a promoted trial's record at ``rung`` (its parameters are added by the caller)."""
    scores = record.get("scores") or {}
    return {"number": number, "rung": rung, "budget_epochs": record.get("epochs"), "images": record.get("images"),
            "state": "COMPLETE" if scores else "FAIL", **{k: scores.get(k) for k in
                                                          ("ca", "val_accuracy", "ra_t", "ra_q", "best_epoch")},
            "duration_s": scores.get("seconds"), "node": record.get("node"), "run_dir": record.get("run_dir"),
            "failure": record.get("failure"), "intervals": scores.get("intervals") or {}}


def rung_dir_name(number: int, rung: int) -> str:
    """A trial's run directory at ``rung``: rung 0's is the trial's own."""
    return f"trial_{number:04d}" if rung == 0 else f"trial_{number:04d}_r{rung}"


class Ladder:
    """A multi-fidelity study's rungs: their budgets, what was scored at each, the promotions due.

    Rung 0's results are the study's completed Optuna trials (the sampler was told them); a higher rung's
    are records in the study's user attributes, ``rung.<trial>.<k>`` -> {scores, epochs, images, run_dir,
    node, failure}, written once the promoted trial has ended (a diverged or failed one is recorded too, so
    it is not promoted again; a lost or cancelled one is not, so it is due again).
    """

    def __init__(self, cfg, study, min_acc: float) -> None:
        from .settings import rung_epochs, rung_images

        f = cfg.tune.fidelity
        self.epochs = rung_epochs(cfg.train.epochs, cfg.train.rounds, f.rungs, f.reduction_factor, f.min_epochs)
        # cfg is the trials' config: attack.num_samples is the selection already
        self.images = rung_images(cfg.attack.num_samples, len(self.epochs), f.reduction_factor, f.min_images)
        self.eta, self.study, self.min_acc, self.objectives = f.reduction_factor, study, min_acc, cfg.tune.objectives
        self.running: set[tuple[int, int]] = set()

    @property
    def top(self) -> int:
        return len(self.epochs) - 1

    def budget(self, rung: int) -> dict[str, int]:
        return {"rung": rung, "rungs": len(self.epochs), "epochs": self.epochs[rung], "images": self.images[rung]}

    def records(self) -> dict[tuple[int, int], dict[str, Any]]:
        out = {}
        for key, value in self.study.user_attrs.items():
            parts = key.split(".")
            if len(parts) == 3 and parts[0] == "rung":
                out[int(parts[1]), int(parts[2])] = value
        return out

    def record(self, number: int, rung: int, record: dict[str, Any]) -> None:
        self.study.set_user_attr(f"rung.{number}.{rung}", record)

    def scored(self) -> list[list[Scored]]:
        """Each rung's results so far, as the promotions rank them: the objectives and the validation
        accuracy (already one of them with ``tune.objectives=accuracy``), all maximised, and no accuracy
        floor (see the module's docstring)."""
        import optuna

        from .outputs import objective_values

        def point(scores: dict[str, Any]) -> tuple[float, ...]:
            values = tuple(objective_values(scores, self.objectives))
            return values if self.objectives == "accuracy" else (*values, scores["val_accuracy"])

        rungs: list[list[Scored]] = [[] for _ in self.epochs]
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            rungs[0].append(Scored(t.number, point(t.user_attrs)))
        for (number, k), rec in self.records().items():
            s = rec.get("scores")
            if s and k < len(rungs):
                rungs[k].append(Scored(number, point(s)))
        return rungs

    def due(self) -> list[tuple[int, int]]:
        """Promotions due now (trial, rung), highest rung first; none already run, running or recorded."""
        started: list[set[int]] = [set() for _ in self.epochs]
        for number, k in [*self.records(), *self.running]:
            if k < len(started):
                started[k].add(number)
        return promotions(self.scored(), started, self.eta)
