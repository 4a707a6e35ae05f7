"""The ``deployment`` config section: how many nodes, how the training set is split between them, and (in
simulation) which of them cheat.

Its schema and checks, next to :mod:`fedrobust.partition` that reads it (and :mod:`fedrobust.behaviours`,
``malicious``); composed into the whole config by :mod:`fedrobust.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig

from .errors import ConfigError, check

__all__ = ["DEPLOYMENTS", "DeploymentConfig", "check_deployment"]

DEPLOYMENTS = ("centralized", "deep_ensemble", "distributed_iid", "distributed_dirichlet")


@dataclass
class DeploymentConfig:
    name: str = "distributed_dirichlet"  # centralized | deep_ensemble | distributed_iid | distributed_dirichlet
    num_nodes: int = 3  # nodes, each training one member (centralized: one node)
    alpha: float = 0.9  # Dirichlet concentration (distributed_dirichlet only)
    partition_seed: int = 123  # fixed independently of train.seed
    # training images the server keeps for screening members (ensemble.screen); no node ever gets them
    server_images: int = 0
    # simulation only: nodes that cheat, e.g. [{node: 1, behaviour: scale, factor: 100}] (fedrobust.behaviours)
    malicious: list[dict[str, Any]] = field(default_factory=list)


def check_deployment(cfg: DictConfig) -> None:
    d = cfg.deployment
    check(d.name in DEPLOYMENTS, "deployment.name", f"unknown deployment '{d.name}' (choose from {', '.join(DEPLOYMENTS)})")
    check(d.num_nodes >= 1, "deployment.num_nodes", f"must be >= 1, got {d.num_nodes}")
    check(d.alpha > 0, "deployment.alpha", f"must be > 0, got {d.alpha}")
    check(d.server_images >= 0, "deployment.server_images", f"must be >= 0, got {d.server_images}")
    from .behaviours import check_malicious
    from .partition import num_nodes

    try:
        check_malicious(d.malicious, num_nodes(d.name, d.num_nodes))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
