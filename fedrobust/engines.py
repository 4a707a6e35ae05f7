"""Engines: how the nodes' training is carried out.

* ``simulation``: Flower's simulation engine on Ray, one virtual SuperNode
  per node, ``engine.num_cpus``/``engine.num_gpus`` per client, torch threads
  set to match in the ClientApp. It runs in a child process of its own
  session (:func:`run_simulation`), so that the caller never has Ray or
  Flower's threads in its own process: a signal, a failure or a cancel ends
  the child and everything it started with one ``killpg``.
* ``inline``: the same :func:`fedrobust.node.train_node_round` called in this
  process, node after node, with the same thread count.

Both feed :func:`fedrobust.federation.collect_members`, so with the same seed
on CPU they produce the same member weights.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import math
import os
import select
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import DictConfig

from .behaviours import build_behaviour, malicious_nodes
from .federation import collect_members, peers_of
from .errors import ConfigError, one_line
from .interrupt import as_interrupt, deferred, hold
from .node import MemberUpdate, train_node_round
from .partition import num_nodes
from .resume import TrainingStage
from .sessions import import_path
from .task import node_task

__all__ = ["SimulationError", "backend_config", "launch_order", "run_inline", "run_simulation", "simulate_in_process",
           "torch_threads"]

log = logging.getLogger("fedrobust")


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_inline(cfg: DictConfig, missing: dict | None = None, stage: TrainingStage | None = None) -> list[MemberUpdate]:
    """Train every node's members in this process and return the validated members.

    Members left out under ``engine.on_missing=min_members`` (diverged ones)
    are recorded in ``missing``, for :func:`fedrobust.run.finalize_run`.
    With a ``stage`` (:mod:`fedrobust.resume`), training goes from its start to its stop, and the stage
    is left holding the trainers as they are at its stop.
    """
    nodes = range(num_nodes(cfg.deployment.name, cfg.deployment.num_nodes))
    states: dict[int, dict] = {node: {} for node in nodes}
    if stage is not None:
        states = stage.states = {node: stage.states.get(node, {}) for node in nodes}
    until = stage.stop if stage is not None else None
    task = node_task(cfg)  # what a ClientApp is sent, so both engines train from the same task
    cheats = malicious_nodes(cfg.deployment.malicious)  # simulated cheating nodes (fedrobust.behaviours)
    behaviours = {}
    if cheats:
        from .node import dataset_of_task

        classes = dataset_of_task(task).num_classes
        behaviours = {n: build_behaviour(name, options, classes) for n, (name, options) in cheats.items()}

    def train_round(round_idx: int, current: dict[int, dict]) -> Iterator[MemberUpdate]:
        # Every node gets the peers of the round's start; the server checks each node's members as they
        # come, so a divergence fails the run before the next node trains.
        peers = {node: peers_of(cfg, node, current) for node in states}
        for node, state in states.items():
            yield from train_node_round(task, node, round_idx, state, peers=peers[node], until=until,
                                        behaviour=behaviours.get(node))

    with torch_threads(int(cfg.engine.num_cpus)):
        return collect_members(cfg, train_round, missing, stage)


def launch_order(cfg: DictConfig) -> list[int]:
    """The nodes, the largest training shard first (ties by index): the order the simulation engine starts
    them in. With fewer CPUs than nodes, the longest training then starts first instead of waiting for a
    slot (longest processing time first). The Fashion-MNIST demo's three nodes (18,742, 8,983 and 20,274
    images) on 2 CPUs: the last member came in at 122 s in index order (the largest shard started when the
    smallest had ended)."""
    from .data import DataError
    from .node import dataset_of_task, shards_for

    task = node_task(cfg)
    try:
        sizes = [len(s.train) for s in shards_for(task, dataset_of_task(task))]
    except DataError:  # the data only on the cluster's other machines: index order
        return list(range(num_nodes(cfg.deployment.name, cfg.deployment.num_nodes)))
    return sorted(range(len(sizes)), key=lambda n: (-sizes[n], n))


class _DropRunSimulationNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "run_simulation" not in msg and "deprecated feature" not in msg.lower()


class SimulationError(RuntimeError):
    """The simulation failed (its runtime, or the run itself); the message is one line."""


def _root_cause(exc: BaseException) -> str:
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__
    text = one_line(exc)
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


def run_simulation(cfg: DictConfig, run_dir: Path, *, num_cpus: int | None = None,
                   pid_file: Path | None = None) -> None:
    """Run the federation on Flower's simulation engine; the ServerApp writes ``run_dir``.

    ``num_cpus`` caps the CPUs of the private Ray instance (default: all of
    this machine's). The simulation runs in ``python -m fedrobust.simprocess``,
    a child process in a session of its own (:mod:`fedrobust.sessions`); its
    output is copied to this process's stderr, and ``pid_file`` (if given)
    holds its pid and its Ray folder while it runs, for a cleanup from
    outside. It takes no signal: this process's main thread waits on it in
    Python, and whatever ends the wait (a signal's
    :class:`~fedrobust.interrupt.Interrupted`, a Ray task's cancel, an error)
    kills the child's process group at once, removes the private Ray folder
    and any half-written file, and goes on. No Flower or Ray thread is left in
    this process to race with, and nothing the child printed after the kill
    can reach the terminal. A failed simulation raises
    :class:`SimulationError` (or :class:`~fedrobust.errors.ConfigError`) with
    the child's one-line message.
    """
    from .config import config_to_json
    from .progress import interactive
    from .rayinit import private_temp_dir
    from .sessions import end_group, spawn

    n = num_nodes(cfg.deployment.name, cfg.deployment.num_nodes)
    backend = backend_config(cfg, num_cpus)
    where = (f"the Ray cluster at {cfg.engine.ray_address}" if cfg.engine.ray_address
             else f"a private local Ray instance of {backend['init_args']['num_cpus']} CPU(s)")
    log.info("simulation engine: %d virtual SuperNode(s), %s CPU / %s GPU per client, on %s", n, cfg.engine.num_cpus,
             cfg.engine.num_gpus, where)
    env = dict(os.environ, PYTHONPATH=import_path())
    if not cfg.engine.ray_address:  # a private instance: never a cluster named in the environment
        env = {k: v for k, v in env.items() if not k.startswith("RAY_ADDRESS")}
    if interactive():
        env["FEDROBUST_TTY"] = "1"  # its stderr is a pipe to ours, which is a terminal
    temp_dir = proc = result_r = None
    try:
        with deferred():  # a signal meanwhile is taken once the folder, the pipe and the child are held
            temp_dir = None if cfg.engine.ray_address else private_temp_dir()
            result_r, result_w = os.pipe()
            try:
                proc = spawn([sys.executable, "-m", "fedrobust.simprocess", str(run_dir), str(num_cpus or 0),
                              temp_dir or "", str(result_w)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, pass_fds=(result_w,))
            finally:
                os.close(result_w)
        if pid_file is not None:
            pid_file.write_text(f"{proc.pid}\n{temp_dir or ''}\n")
        with contextlib.suppress(BrokenPipeError):  # a child that died at once says why in its output
            proc.stdin.write(config_to_json(cfg).encode())
            proc.stdin.close()
        _copy_output_until_it_ends(proc)
    except BaseException as exc:
        # Kill it all before anything else; a signal now is the stop that is already under way (or,
        # after an error, is taken once the wind-down is done).
        with deferred(deliver=as_interrupt(exc) is None):
            if proc is not None:
                end_group(proc)
                hold("wind-down")
            _clean_up(run_dir, temp_dir, pid_file, result_r)
        raise
    with deferred():  # the child has ended: what it leaves is cleared whole before a signal is taken
        code = end_group(proc)  # what the child left in its group goes with it
        with os.fdopen(result_r, "rb") as f:
            said = f.read()
        _clean_up(run_dir, temp_dir, pid_file, None)
    if code != 0:
        reason = json.loads(said) if said else {
            "message": f"simulation runtime failed: its process ended with exit code {code} and no error line "
                       f"(see {run_dir / 'train.log'})", "config_error": False}
        if reason.get("diverged"):  # a member's training diverged: its own kind, for the tuner
            from .training import DivergedError

            raise DivergedError(reason["message"])
        raise (ConfigError if reason["config_error"] else SimulationError)(reason["message"])


def _copy_output_until_it_ends(proc: subprocess.Popen) -> None:
    """Copy the child's output to stderr until the child has ended (left unreaped)."""
    from .sessions import ended

    fd = proc.stdout.fileno()
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    open_ = True
    while not ended(proc):
        if not open_:  # its output is closed, it is still ending
            select.select([], [], [], 0.1)
            continue
        if select.select([fd], [], [], 0.2)[0]:
            data = os.read(fd, 65536)
            if not data:
                open_ = False
                continue
            with contextlib.suppress(OSError, ValueError):  # a closed or broken stderr loses the copy only
                sys.stderr.write(text.decode(data))
                sys.stderr.flush()
    os.set_blocking(fd, False)
    with contextlib.suppress(OSError, ValueError):
        while data := os.read(fd, 65536):
            sys.stderr.write(text.decode(data))
        sys.stderr.flush()


def _clean_up(run_dir: Path, temp_dir: str | None, pid_file: Path | None, fd: int | None) -> None:
    """After the child's group is gone: its Ray folder, a half-written file it left, the INCOMPLETE mark
    of a run it had finished, the pid file."""
    from .atomic import remove_leftovers
    from .run import settle_run_dir

    if fd is not None:
        os.close(fd)
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)
    remove_leftovers(Path(run_dir))
    settle_run_dir(Path(run_dir))
    if pid_file is not None:
        pid_file.unlink(missing_ok=True)


def simulate_in_process(cfg: DictConfig, run_dir: Path, *, num_cpus: int | None = None,
                        temp_dir: str | None = None) -> None:
    """The simulation in this process: Ray started (or joined) here, Flower's run in this thread.

    What :func:`run_simulation`'s child runs. It handles no signal, and leaves
    Flower's threads as they are on an error: its process is meant to be
    ended by its parent. A failure of the runtime raises
    :class:`SimulationError` and stops the ServerApp, so the process never
    waits on a dead runtime.
    """
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray
    from flwr.simulation import run_simulation as flwr_run_simulation

    from clients.client_app import make_app

    from .rounds import make_server_app

    # We call the Python API on purpose (it lets the CLI own the run directory);
    # `flwr run .` is supported as well, so drop Flower's deprecation notice.
    flwr_log = logging.getLogger("flwr")
    if not any(isinstance(f, _DropRunSimulationNotice) for f in flwr_log.filters):
        flwr_log.addFilter(_DropRunSimulationNotice())
    backend = backend_config(cfg, num_cpus)
    init_args = backend["init_args"]
    if temp_dir and init_args.get("address") == "local":
        init_args["_temp_dir"] = temp_dir
    errors: list[BaseException] = []
    stop = threading.Event()
    hold("ray-starting")
    started = not ray.is_initialized()
    try:
        if started:
            # Flower would start Ray the same way (its RayBackend) but write the path into this
            # process's environment; the workers get it through their runtime env only
            ray.init(runtime_env={"env_vars": {"PYTHONPATH": import_path()}}, **({"include_dashboard": False} | init_args))
    except Exception as exc:  # no Ray to run on (a cluster that cannot be reached, ...)
        raise SimulationError(f"simulation runtime failed: {_root_cause(exc)}") from None
    try:
        try:
            client_app = make_app(launch_order(cfg), malicious_nodes(cfg.deployment.malicious))
            flwr_run_simulation(server_app=make_server_app(cfg, run_dir, errors, stop), client_app=client_app,
                                num_supernodes=num_nodes(cfg.deployment.name, cfg.deployment.num_nodes),
                                backend_config=backend)
        except BaseException as exc:  # flwr exits through sys.exit for some failures
            if errors:  # read before the ServerApp is stopped, which would add an error of its own
                raise errors[0] from None
            raise SimulationError(f"simulation runtime failed: {_root_cause(exc)}") from None
        if errors:
            raise errors[0]
    finally:
        stop.set()  # the ServerApp thread gives up waiting for replies
    # Flower shut Ray down as it returned. After a failure Ray is left as it is: Flower's threads may
    # still be inside it, and the parent ends the whole process group.
    if started and ray.is_initialized():
        ray.shutdown()
