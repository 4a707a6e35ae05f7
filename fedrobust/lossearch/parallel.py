"""Candidates' fitness on Ray (``loss_search.ray_address``), as tuning trials run on Ray.

The problem (the attacked model on the CPU, the search images, PGD's
settings) is put in Ray's object store once; each task measures a chunk of
a generation's new expressions with one thread. ``local`` starts a private
Ray instance for the search (stopped with it); any other address joins a
running cluster, which is only disconnected at the end.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace

from ..rayinit import RaySession
from .fitness import Problem

__all__ = ["RayFitness"]


def _measure_chunk(problem: Problem, keys: list[str]) -> list[tuple[float, str]]:
    import torch

    torch.set_num_threads(1)
    return [problem.fitness(k) for k in keys]


class RayFitness:
    def __init__(self, problem: Problem, address: str) -> None:
        self._problem_here, self._address = problem, address
        self._session = RaySession()  # nothing started yet: see start()

    def start(self) -> RayFitness:
        """Start (or join) Ray; a signal meanwhile is taken at once, and :meth:`close` ends what was started."""
        import ray

        self._ray = ray
        kwargs = {"log_to_driver": False, "configure_logging": False}
        if self._address == "local":
            kwargs |= {"address": "local", "include_dashboard": False, "num_cpus": os.cpu_count() or 1}
        else:
            kwargs["address"] = self._address
        self._session.start(**kwargs)  # the driver in a thread of its own: the search's signals stay ours
        problem = self._problem_here
        cpu = replace(problem, model=copy.deepcopy(problem.model).cpu(), x=problem.x.cpu(), y=problem.y.cpu())
        self._problem = ray.put(cpu)
        self._task = ray.remote(_measure_chunk).options(num_cpus=1, max_retries=2)
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return self

    def measure(self, keys: list[str], on_done=None):
        """Fitness of each key, in order, from chunks measured in parallel."""
        size = max(1, -(-len(keys) // (2 * self.workers)))
        chunks = [keys[i : i + size] for i in range(0, len(keys), size)]
        refs = [self._task.remote(self._problem, chunk) for chunk in chunks]
        for ref, chunk in zip(refs, chunks):
            yield from self._ray.get(ref)
            if on_done:
                on_done(len(chunk))

    def close(self) -> None:
        self._session.close()
