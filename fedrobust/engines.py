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
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig

from .federation import collect_members, peers_of
from .interrupt import as_interrupt, keep_handlers
from .node import MemberUpdate, train_node_round
from .partition import num_nodes
from .task import node_task

__all__ = ["SimulationError", "backend_config", "run_inline", "run_simulation", "torch_threads"]

log = logging.getLogger("fedrobust")


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_inline(cfg: DictConfig, missing: dict | None = None) -> list[MemberUpdate]:
    """Train every node's members in this process and return the validated members.

    Members left out under ``engine.on_missing=min_members`` (diverged ones)
    are recorded in ``missing``, for :func:`fedrobust.run.finalize_run`.
    """
    states: dict[int, dict] = {node: {} for node in range(num_nodes(cfg.deployment.name, cfg.deployment.num_nodes))}
    task = node_task(cfg)  # what a ClientApp is sent, so both engines train from the same task

    def train_round(round_idx: int, current: dict[int, dict]) -> Iterator[MemberUpdate]:
        # Every node gets the peers of the round's start; the server checks each node's members as they
        # come, so a divergence fails the run before the next node trains.
        peers = {node: peers_of(cfg, node, current) for node in states}
        for node, state in states.items():
            yield from train_node_round(task, node, round_idx, state, peers=peers[node])

    with torch_threads(int(cfg.engine.num_cpus)):
        return collect_members(cfg, train_round, missing)


class _DropRunSimulationNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "run_simulation" not in msg and "deprecated feature" not in msg.lower()


class SimulationError(RuntimeError):
    """Flower's simulation runtime (or the Ray instance under it) failed; the message is one line."""


def _root_cause(exc: BaseException) -> str:
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:400]


def backend_config(cfg: DictConfig, num_cpus: int | None = None) -> dict:
    """Flower's Ray backend settings: client resources, and how Ray is started or joined.

    With ``engine.ray_address`` the simulation joins that cluster, whose
    resources decide how many client actors run and where (Flower places
    one actor per ``engine.num_cpus``/``engine.num_gpus`` that a node has
    free). Without it, a new local instance is started (``address="local"``)
    even where a cluster runs on this machine or ``RAY_ADDRESS`` is set. It
    gets this machine's CPUs (or ``num_cpus``), but no more than the virtual
    nodes can use: Flower would start an actor for every ``engine.num_cpus``
    of it, and each actor imports torch whether or not a node ever runs on it.
    """
    init_args: dict = {"logging_level": "error", "log_to_driver": False}
    if cfg.engine.ray_address:
        init_args["address"] = cfg.engine.ray_address
    else:
        usable = math.ceil(num_nodes(cfg.deployment.name, cfg.deployment.num_nodes) * cfg.engine.num_cpus)
        cpus = min(num_cpus or os.cpu_count() or 1, max(1, usable))
        # no idle workers at start: Flower's actors carry a runtime env (PYTHONPATH), so Ray starts
        # workers of their own for them and the prestarted ones would only import Ray and wait
        init_args |= {"address": "local", "num_cpus": cpus, "include_dashboard": False,
                      "_system_config": {"prestart_worker_first_driver": False}}
        if cfg.engine.num_gpus > 0:
            init_args["num_gpus"] = torch.cuda.device_count()
    return {"client_resources": {"num_cpus": cfg.engine.num_cpus, "num_gpus": cfg.engine.num_gpus},
            "init_args": init_args}


def _start_ray(init_args: dict) -> bool:
    """Start (or join) Ray as Flower's RayBackend would, but here, in the calling thread, keeping our
    SIGINT/SIGTERM handlers (``ray.init`` replaces SIGTERM's); True if this call started it. Flower
    then finds Ray initialised and uses it. In the main thread, the kernel kills the private
    instance's services when this process ends (Ray ties them to the thread that started them)."""
    import ray

    if ray.is_initialized():
        return False
    # the client actors import clients.client_app, fedrobust and plug-ins: this process's path, once each
    # (a second simulation in the same process must not grow it)
    entries = [*sys.path, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    pythonpath = os.pathsep.join(dict.fromkeys(e for e in entries if e))
    os.environ["PYTHONPATH"] = pythonpath
    with keep_handlers():
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **({"include_dashboard": False} | init_args))
    return True


def _kill_actors() -> None:
    """Kill the Ray actors this process holds handles to: Flower's client actors, the only ones it
    creates. ``ray.kill`` ends them as asked for (a killed worker would be reported by Ray's error
    printer, and killing a worker process by id would reach Ray's agents, named ``ray::...`` too)."""
    import gc

    import ray

    for obj in gc.get_objects():
        if issubclass(type(obj), ray.actor.ActorHandle):  # not isinstance: it asks lazy modules for __class__
            with contextlib.suppress(Exception):
                ray.kill(obj, no_restart=True)


def _wind_down(done: threading.Event, stop: threading.Event) -> None:
    """After an interruption: stop the ServerApp and kill the client actors, so that Flower's workers
    return. Flower and Ray log nothing from here on (a killed actor is no error now). Waits at most
    ``_WIND_DOWN_S`` for Flower to return, then shuts Ray down here (a private instance stops, a
    cluster is left); the caller ends the process after that (:func:`fedrobust.interrupt.exit_now`)."""
    import ray

    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    logging.getLogger("flwr").disabled = True
    # Flower's cleanup calls ray.shutdown() while its other threads may still be inside Ray, and a call
    # into Ray's core worker after shutdown makes Ray's C++ end the process at once with exit code 1
    # ("The core worker has already been shutdown ... The process will exit"), before ours. So nobody
    # shuts Ray down while Flower's threads run: ray.shutdown is a no-op until Flower has returned,
    # then it runs here, in this thread; if Flower never returns, the caller's exit_now kills the
    # private instance's processes by id.
    real_shutdown = ray.shutdown
    ray.shutdown = lambda *args, **kwargs: None
    stop.set()
    deadline = time.monotonic() + _WIND_DOWN_S
    while not done.is_set() and time.monotonic() < deadline:
        if ray.is_initialized():
            _kill_actors()  # again each time: Flower may have been creating its actors
        done.wait(0.5)
    if done.is_set():
        ray.shutdown = real_shutdown
        with contextlib.suppress(Exception):
            if ray.is_initialized():
                real_shutdown()


# An interrupted simulation waits this long for Flower's threads to return (measured: about 1-2 s once
# the actors are killed); then the process ends regardless.
_WIND_DOWN_S = 5.0


def run_simulation(cfg: DictConfig, run_dir: Path, *, num_cpus: int | None = None) -> None:
    """Run the federation on Flower's simulation engine; the ServerApp writes ``run_dir``.

    ``num_cpus`` caps the CPUs of the private Ray instance (default: all of
    this machine's). A failure of the runtime raises :class:`SimulationError`
    and stops the ServerApp, so the process never waits on a dead runtime.

    Ray is started here, in the calling thread, and Flower runs in a thread of
    its own, so that SIGINT and SIGTERM reach this thread in Python code (never
    inside Ray) and raise :class:`~fedrobust.interrupt.Interrupted`. It is
    raised after :func:`_wind_down`; Flower's threads may still be blocked in
    Ray then, so a command ends its process with
    :func:`fedrobust.interrupt.exit_now` once it has said what it kept.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation as flwr_run_simulation

    from clients.client_app import app as client_app

    from .server_app import make_server_app

    # We call the Python API on purpose (it lets the CLI own the run directory);
    # `flwr run .` is supported as well, so drop Flower's deprecation notice.
    flwr_log = logging.getLogger("flwr")
    if not any(isinstance(f, _DropRunSimulationNotice) for f in flwr_log.filters):
        flwr_log.addFilter(_DropRunSimulationNotice())
    errors: list[BaseException] = []
    failed: list[BaseException] = []
    stop = threading.Event()
    n = num_nodes(cfg.deployment.name, cfg.deployment.num_nodes)
    backend = backend_config(cfg, num_cpus)
    where = (f"the Ray cluster at {cfg.engine.ray_address}" if cfg.engine.ray_address
             else f"a private local Ray instance of {backend['init_args']['num_cpus']} CPU(s)")
    log.info("simulation engine: %d virtual SuperNode(s), %s CPU / %s GPU per client, on %s", n, cfg.engine.num_cpus,
             cfg.engine.num_gpus, where)

    def simulate() -> None:
        try:
            flwr_run_simulation(
                server_app=make_server_app(cfg, run_dir, errors, stop),
                client_app=client_app,
                num_supernodes=n,
                backend_config=backend,
            )
        except BaseException as exc:  # flwr exits through sys.exit for some failures
            failed.append(exc)
        finally:
            done.set()

    done = threading.Event()  # waited on, not sim.join(): a join that a signal interrupts marks the thread
    #                           ended while it runs (CPython 3.11's Thread._wait_for_tstate_lock)
    sim = threading.Thread(target=simulate, name="flwr-simulation", daemon=True)
    try:
        try:
            started = _start_ray(backend["init_args"])
        except Exception as exc:  # no Ray to run on (a cluster that cannot be reached, ...)
            raise SimulationError(f"simulation runtime failed: {_root_cause(exc)}") from None
        sim.start()
        while not done.wait(0.2):
            pass
        import ray

        if started and ray.is_initialized():
            ray.shutdown()  # Flower shuts Ray down, unless it failed before it built its backend
        if failed:  # read before the ServerApp is stopped, which would add an error of its own
            if errors:
                raise errors[0] from None
            raise SimulationError(f"simulation runtime failed: {_root_cause(failed[0])}") from None
    except BaseException as exc:
        if as_interrupt(exc) is not None and sim.ident is not None:  # else Ray was starting: nothing to wind down
            _wind_down(done, stop)
        raise
    finally:
        stop.set()  # the ServerApp thread gives up waiting for replies
    if errors:
        raise errors[0]
