"""The genetic program of AutoLoss-AR (paper 004, sec. IV-C), on DEAP.

DEAP (the paper's own library) supplies the tree individuals, ramped
half-and-half initialisation, tournament selection, one-point crossover,
uniform subtree mutation and the static depth limit. Its trees are only
ever converted to :data:`~fedrobust.attacks.expression.Tree` data, never
passed to ``gp.compile`` (which evaluates a string).

DEAP draws from Python's global ``random``; :class:`Breeder` swaps its own
state in for each call and out again, so a search is reproducible from its
seed, a checkpoint holds that state, and nothing else in the process sees it.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Sequence
from contextlib import contextmanager

from deap import algorithms, base, creator, gp, tools

from ..attacks.expression import PRIMITIVES, Tree, check

__all__ = ["Breeder", "from_deap", "primitive_set", "to_deap"]


def primitive_set() -> gp.PrimitiveSet:
    """Table I's primitives over the inputs p, q and the constants 0, 1 (untyped: every value is a tensor)."""
    pset = gp.PrimitiveSet("LOSS", 2)
    pset.renameArguments(ARG0="p", ARG1="q")
    for name, (arity, fn) in PRIMITIVES.items():
        pset.addPrimitive(fn, arity, name=name)
    pset.addTerminal(0.0, name="0")
    pset.addTerminal(1.0, name="1")
    return pset


_ARGS = {"ARG0": "p", "ARG1": "q"}  # DEAP keeps the inputs' first names on their nodes


def from_deap(individual: Sequence) -> Tree:
    """A DEAP tree (a prefix list of nodes) as expression data."""
    stack: list[list] = []
    root: Tree | None = None
    for node in individual:
        if node.arity == 0:
            item: Tree = _ARGS.get(node.name, node.name)
        else:
            stack.append([node.name, node.arity])
            continue
        while stack:
            stack[-1].append(item)
            name, arity, *children = stack[-1]
            if len(children) < arity:
                break
            stack.pop()
            item = (name, *children)
        else:
            root = item
    if root is None or stack:
        raise ValueError("not a complete DEAP tree")
    return root


def to_deap(tree: Tree, pset: gp.PrimitiveSet) -> list:
    """Expression data as a DEAP prefix node list (for an individual)."""
    check(tree)
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            out.append(pset.mapping[node])
        else:
            out.append(pset.mapping[node[0]])
            stack.extend(reversed(node[1:]))
    return out


if not hasattr(creator, "LossFitness"):
    creator.create("LossFitness", base.Fitness, weights=(-1.0,))  # robust accuracy left by PGD: lower is better
    creator.create("LossTree", gp.PrimitiveTree, fitness=creator.LossFitness)


class Breeder:
    """Initialisation, selection and variation, reproducible from a seed or a saved state.

    Parameters follow Table IV: ``tournament`` (ts), ``selections`` (st, the size of the next
    population), ``crossover`` (cp), ``mutation`` (mp), ``max_depth`` (md).
    """

    def __init__(self, *, seed: int, tournament: int, selections: int, crossover: float, mutation: float,
                 max_depth: int, init_depth: tuple[int, int] = (1, 4), mutation_depth: int = 2) -> None:
        self.pset = primitive_set()
        self.tournament, self.selections = tournament, selections
        self.crossover, self.mutation = crossover, mutation
        self.rng_state = random.Random(seed).getstate()
        tb = base.Toolbox()
        tb.register("expr", gp.genHalfAndHalf, pset=self.pset, min_=init_depth[0], max_=init_depth[1])
        tb.register("individual", tools.initIterate, creator.LossTree, tb.expr)
        tb.register("mate", gp.cxOnePoint)
        tb.register("mutant_expr", gp.genFull, min_=0, max_=mutation_depth)
        tb.register("mutate", gp.mutUniform, expr=tb.mutant_expr, pset=self.pset)
        limit = gp.staticLimit(key=operator.attrgetter("height"), max_value=max_depth)
        tb.decorate("mate", limit)
        tb.decorate("mutate", limit)
        self.toolbox = tb

    @contextmanager
    def _rng(self):
        outside = random.getstate()
        random.setstate(self.rng_state)
        try:
            yield
        finally:
            self.rng_state = random.getstate()
            random.setstate(outside)

    def individual(self, tree: Tree):
        return creator.LossTree(to_deap(tree, self.pset))

    def initial(self, n: int) -> list[Tree]:
        with self._rng():
            return [from_deap(self.toolbox.individual()) for _ in range(n)]

    def offspring(self, population: Sequence[Tree], fitness: Sequence[float]) -> list[Tree]:
        """Tournament selection of ``selections`` parents, then one-point crossover and mutation (varAnd)."""
        individuals = []
        for tree, f in zip(population, fitness):
            ind = self.individual(tree)
            ind.fitness.values = (f,)
            individuals.append(ind)
        with self._rng():
            parents = tools.selTournament(individuals, self.selections, tournsize=self.tournament)
            children = algorithms.varAnd(parents, self.toolbox, self.crossover, self.mutation)
        return [from_deap(c) for c in children]

    def state(self) -> list:
        version, internal, gauss = self.rng_state
        return [version, list(internal), gauss]

    def restore(self, state: list) -> None:
        version, internal, gauss = state
        self.rng_state = (version, tuple(internal), gauss)
