"""``fedrobust search-loss RUN_DIR``: AutoLoss-AR (paper 004) on a trained run's ensemble.

The search (Fig. 2): a random population of loss trees; each generation,
tournament selection, one-point crossover and mutation (:mod:`.gp`), and the
fitness of every new expression (:mod:`.fitness`): the robust accuracy PGD-10
leaves on the *search images*, drawn from the union of the nodes' validation
splits (training images: the search never sees the test set). The found
losses are then measured on held-out test images (:mod:`.heldout`).

Everything lives in ``RUN_DIR/loss_search/`` (or ``loss_search.out_dir``):

* ``search.json``: the settings, the search images and a key of everything
  the result depends on; a rerun with other settings is refused.
* ``checkpoint.json``: after each generation, the population, its fitness,
  the genetic program's random state and the history; a rerun resumes from
  it, so an interrupted search ends with the hall of fame an uninterrupted
  one would have. ``fitness_cache.jsonl``: every fitness measured, by
  simplified expression, kept as soon as it is measured.
* ``history.csv``, ``fitness.png`` (fitness per generation against the
  hand-made losses), ``tensorboard/`` (the same as scalars).
* ``hall_of_fame.json`` (expression, simplified infix form, search fitness,
  test robust accuracy), ``best.json`` (the loss with the best *search*
  fitness: use it as ``attack.whitebox_loss=file:.../best.json``),
  ``heldout.json`` and ``heldout.md`` (the held-out tables).
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..atomic import atomic_open, save_figure, write_json
from ..attacks.expression import HAND_MADE as HAND_MADE_TREES
from ..attacks.expression import LOSS_FILE_FORMAT, infix, parse, size, to_text
from ..attacks.losses import BUILTIN
from ..data import dataset_of, to_float
from ..runs.cache import content_key
from ..runs.images import Images, evaluation_sample, held_out_images
from ..progress import progress
from ..runs.members import load_ensemble, members_digest
from ..searchdir import claim_folder
from ..training import resolve_device
from .fitness import WORST, FitnessCache, Problem, canonical
from .gp import Breeder

__all__ = ["HAND_MADE", "run_search", "search_dir"]

log = logging.getLogger("fedrobust")

HAND_MADE = BUILTIN  # the built-in losses: the search's baselines and, with hand_made_start, its first trees
_TRAJECTORY = ("generations", "population", "tournament", "selections", "crossover", "mutation", "max_depth",
               "init_min_depth", "init_max_depth", "mutation_depth", "hand_made_start", "seed", "steps", "attack_seed", "split",
               "num_images", "sample_seed", "target")


def search_dir(run_dir: Path, s: DictConfig) -> Path:
    return Path(s.out_dir) if s.out_dir else Path(run_dir) / "loss_search"


def target_model(ensemble, target: str):
    return ensemble if target == "ensemble" else ensemble.members[int(target.split(":")[1])]


class _Search:
    """One search's state on disk and in memory."""

    def __init__(self, run_dir: Path, cfg: DictConfig, s: DictConfig) -> None:
        self.run_dir, self.cfg, self.s = Path(run_dir), cfg, s
        self.out = search_dir(run_dir, s)
        self.device = resolve_device(cfg.train.device)
        self.data = dataset_of(cfg)
        self.ensemble = load_ensemble(run_dir, self.device, cfg).eval()
        self.model = target_model(self.ensemble, s.target)
        self.eps = float(s.eps if s.eps is not None else cfg.attack.eps)
        whole = held_out_images(cfg, self.data, s.split)
        pick = evaluation_sample(whole.pool, s.num_images, s.sample_seed)
        self.images = Images(whole.split, whole.indices[pick], whole.pool, s.sample_seed)
        x, y = self.images.tensors(self.data)
        self.problem = Problem(self.model, to_float(x).to(self.device), y.to(self.device), self.eps, s.steps,
                               s.attack_seed, cfg.attack.batch_size)
        settings = {k: s[k] for k in _TRAJECTORY}
        self.key = content_key({"members": members_digest(self.run_dir), "settings": settings, "eps": self.eps,
                                "data": cfg.data.name, "images": self.images.indices.tolist(), "version": 1})
        self.description = {"run_dir": str(self.run_dir), "key": self.key, "eps": self.eps, "settings": settings,
                            "images": self.images.describe(), "indices": self.images.indices.tolist()}

    # ------------------------------------------------------------------ files
    def claim(self) -> bool:
        """Create the folder or check that it holds this search; True when a checkpoint is there to resume."""
        return claim_folder(self.out, self.description, "checkpoint.json", kind="loss search",
                            label="loss_search.out_dir: ", elsewhere="give another loss_search.out_dir",
                            other="other members, images or eps")


def _measure_here(problem: Problem):
    def measure(keys: list[str], on_done=None):
        for key in keys:
            yield problem.fitness(key)
            if on_done:
                on_done(1)
    return measure


def _record(gen: int, fitness: list[float], cache: FitnessCache, new: int, hits: int, t0: float) -> dict[str, Any]:
    finite = [f for f in fitness if f < WORST]
    return {"generation": gen, "best": min(fitness), "median": statistics.median(fitness),
            "mean_finite": statistics.fmean(finite) if finite else WORST,
            "worst_fitness": sum(f >= WORST for f in fitness), "evaluated": new, "cache_hits": hits,
            "seconds": round(time.perf_counter() - t0, 2)}


def hall_of_fame(cache: FitnessCache, k: int) -> list[dict[str, Any]]:
    """The ``k`` best distinct (simplified) expressions ever measured in this search; ties go to the smaller."""
    rows = []
    for key, fit in cache.values.items():
        tree = parse(key)
        if cache.status.get(key) != "ok" or "p" not in _leaves(tree):
            continue  # a non-finite candidate, or a constant loss
        rows.append((fit, size(tree), key, tree))
    rows.sort(key=lambda r: r[:3])
    return [{"rank": i + 1, "expression": key, "infix": infix(tree), "size": n, "search_fitness": fit}
            for i, (fit, n, key, tree) in enumerate(rows[:k])]


def _leaves(tree) -> set[str]:
    if isinstance(tree, str):
        return {tree}
    return set().union(*(_leaves(c) for c in tree[1:]))


def _plot(out: Path, history: list[dict], baselines: dict[str, float]) -> None:
    from ..views import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    gens = [h["generation"] for h in history]
    ax.plot(gens, [h["best"] for h in history], "o-", label="best of the population")
    ax.plot(gens, [h["median"] for h in history], ".--", label="median")
    for (name, value), style in zip(baselines.items(), (":", "-.", (0, (5, 1)))):
        ax.axhline(value, color="grey", linestyle=style, label=f"{name} (hand-made)")
    ax.set_xlabel("generation")
    ax.set_ylabel("robust accuracy after PGD (search images)")
    ax.set_title("AutoLoss-AR: fitness per generation (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "fitness.png", dpi=120)
    plt.close(fig)


def run_search(run_dir: str | Path, cfg: DictConfig, s: DictConfig, log_file: bool = False) -> dict[str, Any]:
    """Run (or resume) a search and its held-out measurement; the hall of fame and the held-out tables.

    ``log_file``: also log to ``search.log`` in the search's folder.
    """
    from torch.utils.tensorboard import SummaryWriter

    search = _Search(Path(run_dir), cfg, s)
    resume = search.claim()
    out = search.out
    if log_file:
        from ..run import setup_logging

        setup_logging(out, "search.log")
    cache = FitnessCache(out / "fitness_cache.jsonl")
    breeder = Breeder(seed=s.seed, tournament=s.tournament, selections=s.selections, crossover=s.crossover,
                      mutation=s.mutation, max_depth=s.max_depth, init_depth=(s.init_min_depth, s.init_max_depth),
                      mutation_depth=s.mutation_depth)
    evaluator = _Evaluator(search.problem, s, cfg.train.progress)
    t0 = time.perf_counter()
    if resume:
        state = json.loads((out / "checkpoint.json").read_text())
        breeder.restore(state["random_state"])
        gen, population, fitness = state["generation"], state["population"], state["fitness"]
        history, baselines = state["history"], state["baselines"]
        population = [parse(t) for t in population]
        t0 -= history[-1]["seconds"] if history else 0.0  # history's seconds count the whole search
        log.info("resuming the loss search in %s after generation %d/%d", out, gen, s.generations)
    else:
        baselines = {name: search.problem.robust_accuracy(name) for name in HAND_MADE}
        log.info("search images: %s; eps %.4g; PGD-%d robust accuracy with %s", search.images.describe()["text"],
                 search.eps, s.steps, ", ".join(f"{k} {v:.4f}" for k, v in baselines.items()))
        start = [HAND_MADE_TREES[n] for n in HAND_MADE] if s.hand_made_start else []
        population = start + breeder.initial(s.population - len(start))
        gen, history, fitness = -1, [], []
    with SummaryWriter(str(out / "tensorboard")) as tb, evaluator:
        if gen < 0:
            gen = 0
            fitness = evaluator(cache, population, f"generation 0/{s.generations}")
            history.append(_record(0, fitness, cache, *evaluator.last, t0))
            _checkpoint(out, gen, population, fitness, breeder, history, baselines, tb, cache, s)
        while gen < s.generations:
            gen += 1
            population = breeder.offspring(population, fitness)
            fitness = evaluator(cache, population, f"generation {gen}/{s.generations}")
            history.append(_record(gen, fitness, cache, *evaluator.last, t0))
            _checkpoint(out, gen, population, fitness, breeder, history, baselines, tb, cache, s)
    fame = hall_of_fame(cache, s.hall_of_fame)
    if not fame:
        raise RuntimeError("no candidate loss had a finite value and gradient: nothing to report")
    best = fame[0]
    write_json(out / "best.json", {
        "format": LOSS_FILE_FORMAT, "expression": best["expression"], "infix": best["infix"],
        "search_fitness": best["search_fitness"], "search_images": search.images.describe(), "eps": search.eps,
        "target": s.target, "run_dir": str(search.run_dir), "baselines": baselines,
        "use": f"attack.whitebox_loss=file:{out / 'best.json'}"})
    write_json(out / "hall_of_fame.json", {"baselines": baselines, "entries": fame})
    result = {"hall_of_fame": fame, "baselines": baselines, "history": history, "out_dir": str(out)}
    if s.test:
        from .heldout import measure_heldout

        result["heldout"] = measure_heldout(search, fame, out)  # adds each entry's test robust accuracy
        write_json(out / "hall_of_fame.json", {"baselines": baselines, "entries": fame})
    return result


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """``history.csv``, one row per generation, replaced whole (a kill mid-write leaves the previous one)."""
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[-1]))
        w.writeheader()
        w.writerows(history)


def _checkpoint(out: Path, gen: int, population, fitness, breeder: Breeder, history, baselines, tb, cache, s) -> None:
    rec = history[-1]
    write_json(out / "checkpoint.json", {
        "generation": gen, "population": [to_text(t) for t in population], "fitness": fitness,
        "random_state": breeder.state(), "history": history, "baselines": baselines})
    write_history(out / "history.csv", history)
    for k in ("best", "median", "mean_finite", "worst_fitness", "evaluated", "cache_hits"):
        tb.add_scalar(f"loss_search/{k}", rec[k], gen)
    for name, value in baselines.items():
        tb.add_scalar(f"loss_search/hand_made_{name}", value, gen)
    fame = hall_of_fame(cache, 1)
    if fame:
        tb.add_text("loss_search/best", f"`{fame[0]['infix']}`: {fame[0]['search_fitness']:.4f}", gen)
    _plot(out, history, baselines)
    log.info("generation %d/%d: best %.4f, median %.4f, %d new, %d from the cache, %d non-finite (%.0fs)",
             gen, s.generations, rec["best"], rec["median"], rec["evaluated"], rec["cache_hits"],
             rec["worst_fitness"], rec["seconds"])


class _Evaluator:
    """Measures a population's new expressions, in this process or on Ray; shows a progress bar."""

    def __init__(self, problem: Problem, s: DictConfig, show: bool) -> None:
        self.problem, self.s, self.show = problem, s, show
        self.last = (0, 0)
        self.pool = None

    def __enter__(self):
        if self.s.ray_address:
            from ..interrupt import deferred
            from .parallel import RayFitness

            try:
                with deferred():  # the pool is held (and closed by __exit__) before a signal is taken
                    self.pool = RayFitness(self.problem, self.s.ray_address)
                self.pool.start()  # Ray: a signal meanwhile is taken at once
            except BaseException:  # __exit__ is not called when __enter__ raises
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.close()

    def __call__(self, cache: FitnessCache, population, desc: str) -> list[float]:
        keys = {canonical(t) for t in population}
        new = sum(k not in cache for k in keys)
        hits0 = cache.hits
        with progress(total=new, desc=desc, enabled=self.show) as bar:
            measure = self.pool.measure if self.pool is not None else _measure_here(self.problem)
            fitness = cache.evaluate(population, measure, on_done=bar.update)
        self.last = (new, cache.hits - hits0)
        return fitness
