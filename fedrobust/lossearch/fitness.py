"""A candidate loss's fitness: the robust accuracy PGD-10 leaves when it maximises that loss (eq. 8).

Lower is better. An expression whose value or input gradient is not finite
on an image at any step, or that cannot be compiled, gets :data:`WORST`
(the paper sets such a fitness to its worst, sec. IV-C 2). The attack keeps
the worst case, as every white-box figure of the project does: an image
counts as broken if any point PGD evaluated was misclassified.

:class:`FitnessCache` keys fitnesses by the simplified expression
(:func:`~fedrobust.attacks.expression.simplify`), so equivalent trees are
evaluated once; it appends each new value to a JSON-lines file, so an
interrupted search keeps what it measured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..attacks import PGD, NonFiniteLoss, worst_case_accuracy
from ..attacks.expression import SearchedLoss, Tree, parse, simplify, to_text

__all__ = ["WORST", "FitnessCache", "Problem", "canonical"]

WORST = 1.0  # no image broken: worse than any loss that moves PGD at all


class NonFinite(Exception):
    """A candidate's loss or gradient was NaN or infinite."""


class _CheckedPGD(PGD):
    def grad(self, x, y, seen):
        g, loss = super().grad(x, y, seen)
        if not (torch.isfinite(loss).all() and torch.isfinite(g).all()):
            raise NonFinite
        return g, loss


def canonical(tree: Tree) -> str:
    """The cache key: the simplified expression's text form."""
    return to_text(simplify(tree))


@dataclass
class Problem:
    """What a fitness depends on: the model attacked, the search images, the budget and PGD's settings."""

    model: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    y: torch.Tensor
    eps: float
    steps: int = 10
    seed: int = 0
    batch_size: int = 500

    def robust_accuracy(self, loss) -> float:
        """Worst-case robust accuracy under PGD-``steps`` maximising ``loss`` (a name or a callable)."""
        return worst_case_accuracy(self.model, PGD(self.model, self.eps, self.steps, loss=loss, seed=self.seed),
                                   self.x, self.y, self.batch_size)

    def fitness(self, text: str) -> tuple[float, str]:
        """(fitness, status): status is ``ok`` or ``non-finite``."""
        loss = SearchedLoss(parse(text))
        attack = _CheckedPGD(self.model, self.eps, self.steps, loss=loss, seed=self.seed)
        try:
            ra = worst_case_accuracy(self.model, attack, self.x, self.y, self.batch_size)
        except (NonFinite, NonFiniteLoss):
            return WORST, "non-finite"
        return (ra, "ok") if math.isfinite(ra) else (WORST, "non-finite")


class FitnessCache:
    """Fitness by simplified expression, kept in memory and appended to ``path`` (JSON lines)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.values: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.hits = self.misses = 0
        if path is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                    self.values[row["expression"]] = float(row["fitness"])
                    self.status[row["expression"]] = row.get("status", "ok")
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def add(self, key: str, fitness: float, status: str) -> None:
        self.values[key], self.status[key] = fitness, status
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps({"expression": key, "fitness": fitness, "status": status}) + "\n")

    def evaluate(self, trees: Iterable[Tree], measure: Callable[..., Iterable[tuple[float, str]]],
                 on_done: Callable[[int], None] | None = None) -> list[float]:
        """Fitness of each tree; only keys not seen before are measured: ``measure(keys, on_done)`` yields
        ``(fitness, status)`` per key, in order, each kept as soon as it comes."""
        keys = [canonical(t) for t in trees]
        todo = list(dict.fromkeys(k for k in keys if k not in self.values))
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        for key, (fit, status) in zip(todo, measure(todo, on_done) if todo else []):
            self.add(key, fit, status)
        return [self.values[k] for k in keys]
