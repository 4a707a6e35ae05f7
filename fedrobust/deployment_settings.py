"""The ``deployment`` config section: how many nodes, and how the training set is split between them.

Its schema and checks, next to :mod:`fedrobust.partition` that reads it;
composed into the whole config by :mod:`fedrobust.config`.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from .errors import check

__all__ = ["DEPLOYMENTS", "DeploymentConfig", "check_deployment"]

DEPLOYMENTS = ("centralized", "deep_ensemble", "distributed_iid", "distributed_dirichlet")


@dataclass
class DeploymentConfig:
    name: str = "distributed_dirichlet"  # centralized | deep_ensemble | distributed_iid | distributed_dirichlet
    num_nodes: int = 3  # nodes, each training one member (centralized: one node)
    alpha: float = 0.9  # Dirichlet concentration (distributed_dirichlet only)
    partition_seed: int = 123  # fixed independently of train.seed


def check_deployment(cfg: DictConfig) -> None:
    d = cfg.deployment
    check(d.name in DEPLOYMENTS, "deployment.name", f"unknown deployment '{d.name}' (choose from {', '.join(DEPLOYMENTS)})")
    check(d.num_nodes >= 1, "deployment.num_nodes", f"must be >= 1, got {d.num_nodes}")
    check(d.alpha > 0, "deployment.alpha", f"must be > 0, got {d.alpha}")
