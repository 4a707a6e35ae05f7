"""Engines: how the nodes' training is carried out.

* ``simulation``: Flower's simulation engine on Ray, one virtual SuperNode
  per node, ``engine.num_cpus``/``engine.num_gpus`` per client, torch threads
  set to match in the ClientApp.
* ``inline``: the same :func:`fedrobust.node.train_node_round` called in this
  process, node after node, with the same thread count.

Both feed :func:`fedrobust.federation.collect_members`, so with the same seed
on CPU they produce the same member weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from .federation import collect_members, peers_of
from .node import MemberUpdate, train_node_round
from .partition import num_nodes

__all__ = ["run_inline", "run_simulation", "torch_threads"]

log = logging.getLogger("fedrobust")


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_inline(cfg: DictConfig) -> list[MemberUpdate]:
    """Train every node's members in this process and return the validated members."""
    states: dict[int, dict] = {node: {} for node in range(num_nodes(cfg.deployment.name, cfg.deployment.num_nodes))}

    def train_round(round_idx: int, current: dict[int, dict]) -> list[MemberUpdate]:
        updates = []
        with torch_threads(int(cfg.engine.num_cpus)):
            for node, state in states.items():
                updates += train_node_round(cfg, node, round_idx, state, peers=peers_of(cfg, node, current))
        return updates

    return collect_members(cfg, train_round)


class _DropRunSimulationNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "run_simulation" not in msg and "deprecated feature" not in msg.lower()


def run_simulation(cfg: DictConfig, run_dir: Path, *, num_cpus: int | None = None, private_ray: bool = False) -> None:
    """Run the federation on Flower's simulation engine; the ServerApp writes ``run_dir``.

    ``num_cpus`` caps the CPUs the simulation's Ray instance offers (default:
    all); ``private_ray`` starts a new local Ray instance even where another
    one is running (a tuning trial inside the tuner's Ray cluster).
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation as flwr_run_simulation

    from clients.client_app import app as client_app

    from .server_app import make_server_app

    # We call the Python API on purpose (it lets the CLI own the run directory);
    # `flwr run .` is supported as well, so drop Flower's deprecation notice.
    logging.getLogger("flwr").addFilter(_DropRunSimulationNotice())
    errors: list[BaseException] = []
    n = num_nodes(cfg.deployment.name, cfg.deployment.num_nodes)
    backend_config = {
        "client_resources": {"num_cpus": cfg.engine.num_cpus, "num_gpus": cfg.engine.num_gpus},
        "init_args": {"num_cpus": num_cpus or os.cpu_count() or 1, "include_dashboard": False, "logging_level": "error"},
    }
    if private_ray:
        backend_config["init_args"]["address"] = "local"
    if cfg.engine.num_gpus > 0:
        backend_config["init_args"]["num_gpus"] = torch.cuda.device_count()
    log.info("simulation engine: %d virtual SuperNode(s), %s CPU / %s GPU per client", n, cfg.engine.num_cpus, cfg.engine.num_gpus)
    flwr_run_simulation(
        server_app=make_server_app(cfg, run_dir, errors),
        client_app=client_app,
        num_supernodes=n,
        backend_config=backend_config,
    )
    if errors:
        raise errors[0]
