"""The ``engine`` config section: where the nodes run (Flower's simulation on Ray, or inline) and how a run
treats a node that does not answer.

Its schema and checks, next to :mod:`fedrobust.engines` that reads it;
composed into the whole config by :mod:`fedrobust.config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from .errors import check

__all__ = ["ENGINES", "ON_MISSING", "EngineConfig", "check_engine"]

ENGINES = ("simulation", "inline")
ON_MISSING = ("fail", "min_members")


@dataclass
class EngineConfig:
    name: str = "simulation"  # simulation (Flower's simulation engine on Ray) | inline (one process, no Flower)
    num_cpus: float = 1.0  # per client; torch threads are set to match
    num_gpus: float = 0.0  # per client (fractions share a GPU)
    timeout: float = 0.0  # seconds to wait for replies in a round (0 = no limit)
    on_missing: str = "fail"  # a node that does not reply in time: fail | min_members (finish without it)
    min_members: int = 1  # on_missing=min_members: the fewest members the ensemble may end with
    # simulation: join this Ray cluster (HOST:PORT, "auto", ray://...); None = a private local instance
    ray_address: str | None = None


def check_engine(cfg: DictConfig) -> None:
    e = cfg.engine
    check(e.name in ENGINES, "engine.name", f"unknown engine '{e.name}' (choose from {', '.join(ENGINES)})")
    check(e.num_cpus > 0, "engine.num_cpus", f"must be > 0, got {e.num_cpus}")
    check(e.num_gpus >= 0, "engine.num_gpus", f"must be >= 0, got {e.num_gpus}")
    check(e.timeout >= 0, "engine.timeout", f"must be >= 0, got {e.timeout}")
    check(e.on_missing in ON_MISSING, "engine.on_missing",
          f"unknown value '{e.on_missing}' (choose from {', '.join(ON_MISSING)})")
    check(e.ray_address is None or str(e.ray_address).strip() != "", "engine.ray_address",
          "must be HOST:PORT, auto or ray://HOST:PORT (or null for a private local Ray instance)")
    check(e.ray_address is None or e.name == "simulation", "engine.ray_address",
          f"only the simulation engine runs on Ray (engine={e.name})")
    check(e.min_members >= 1, "engine.min_members", f"must be >= 1, got {e.min_members}")
