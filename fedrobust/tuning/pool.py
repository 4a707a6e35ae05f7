"""Run trials as Ray tasks, a bounded number at a time, on a local Ray instance or a cluster.

A task is a streaming generator (:func:`fedrobust.tuning.trial.trial_task`):
it reports where it started, then its scores, then its run directory, which
the pool writes to the destination given at submission
(:func:`fedrobust.tuning.remote.receive_dir`). Nothing is read from or
written to another machine's disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import dumps_json
from ..interrupt import Held
from ..rayinit import RaySession
from .remote import receive_dir

__all__ = ["TrialPool", "Finished", "EventLog", "short_node"]

log = logging.getLogger("fedrobust")

WAIT_SLICE_S = 0.25  # longest time the tuner spends in Ray's wait before its signal handlers can run
FORCED_END_S = 3.0  # how long a force-cancelled task's end is waited for before its stream is left unread


def short_node(where: dict[str, Any]) -> str:
    """``IP/short node id`` (or the host name outside Ray), as ``trials.csv`` shows it."""
    if "node_id" in where:
        return f"{where.get('node_ip', '?')}/{where['node_id'][:8]}"
    return where.get("host", "")


class EventLog:
    """``executions.jsonl``: one JSON line per start, end, fail or loss of a trial, written by the tuner alone."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, event: str, key: Any, **info: Any) -> None:
        line = dumps_json({"event": event, "key": key, **info, "time": time.time()}) + "\n"  # strict JSON
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


@dataclass
class Finished:
    """A task that ended: its scores, or the error, and whether the error was its machine's, not its own."""

    key: Any
    scores: dict[str, Any] | None = None
    error: BaseException | None = None
    lost: bool = False  # the worker, its node or the transfer failed: the trial itself did not raise
    where: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Running:
    key: Any
    dest: Path
    where: dict[str, Any] = field(default_factory=dict)


class TrialPool:
    """Ray tasks with per-task resources; local Ray unless ``address`` names a cluster.

    Ray is started for the pool and stopped with it (a local instance, new
    even where a cluster runs on this machine) or disconnected (a cluster).
    Task output stays in the trials' own logs.
    """

    def __init__(self, fn: Callable, *, address: str | None, cpus: float, gpus: float, max_concurrent: int,
                 on_start: Callable[[Any, dict[str, Any]], None] | None = None) -> None:
        self._fn, self._address, self._cpus, self._gpus = fn, address, cpus, gpus
        self._session: RaySession | None = RaySession()  # nothing started yet: see start()
        self._remote = None
        self.max_concurrent = max_concurrent
        self.on_start = on_start
        self.running: dict[Any, _Running] = {}  # generator -> state

    def start(self) -> TrialPool:
        """Start (or join) Ray. A signal meanwhile is taken at once; what was started is ended then, or by
        :meth:`close` if the signal comes after: build the pool first (inside
        :func:`~fedrobust.interrupt.deferred`), start it second, and close it however the work ends."""
        import ray

        self._ray = ray
        kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
        if self._address:  # a cluster decides its own resources
            kwargs["address"] = self._address
        else:  # a new local instance, even if another one runs on this machine
            kwargs |= {"address": "local", "include_dashboard": False,
                       "num_cpus": max(os.cpu_count() or 1, int(self._cpus * self.max_concurrent + 0.999)),
                       "num_gpus": int(self._gpus * self.max_concurrent + 0.999) if self._gpus else None}
        self._session.start(**{k: v for k, v in kwargs.items() if v is not None})
        # Streaming generator; backpressure keeps at most two unread chunks of a run directory in flight.
        self._remote = ray.remote(self._fn).options(num_cpus=self._cpus, num_gpus=self._gpus, max_retries=0,
                                                    _generator_backpressure_num_objects=2)
        return self

    @property
    def free(self) -> int:
        return self.max_concurrent - len(self.running)

    def put(self, value: Any) -> Any:
        """An object ref for ``value`` in the cluster's object store."""
        return self._ray.put(value)

    def submit(self, key: Any, dest: Path, *args: Any, **kwargs: Any) -> None:
        """Start a task; its run directory will be written to ``dest``."""
        self.running[self._remote.remote(*args, **kwargs)] = _Running(key, Path(dest))

    def wait(self, timeout: float | None = None, held: Held | None = None) -> list[Finished]:
        """Advance the tasks that have something to report; return the ones that ended.

        Called inside :func:`~fedrobust.interrupt.deferred` (``held``), so that what it takes from Ray
        reaches the caller's books before a signal is taken; it returns early once a signal is held."""
        if not self.running:
            return []
        # In slices: a signal is held (or its handler runs) only once Ray's wait returns to Python, so an
        # unbounded wait would hold Ctrl-C or SIGTERM until a trial reports something (minutes, or hours).
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic()))
            ready, _ = self._ray.wait(list(self.running), num_returns=1, timeout=left)
            if ready or (deadline is not None and time.monotonic() >= deadline) or (held is not None and held.pending):
                break
        out = []
        for gen in ready:
            state = self.running[gen]
            try:
                item = self._ray.get(next(gen))
                if item.get("event") == "start":
                    state.where = {k: v for k, v in item.items() if k != "event"}
                    if self.on_start is not None:
                        self.on_start(state.key, state.where)
                    continue
                if item.get("event") != "result":
                    raise RuntimeError(f"unexpected item from a trial: {str(item)[:200]}")
                # The rest of the stream is the run directory, read one chunk at a time.
                receive_dir((self._ray.get(ref) for ref in gen), state.dest)
                done = Finished(state.key, scores=item["scores"], where=state.where)
            except StopIteration:
                done = Finished(state.key, error=RuntimeError("the trial ended without a result"), lost=True,
                                where=state.where)
            except Exception as exc:
                task_error = isinstance(exc, self._ray.exceptions.RayTaskError)
                cause = (getattr(exc, "cause", None) or exc) if task_error else exc
                done = Finished(state.key, error=cause, lost=not task_error, where=state.where)
            if done.lost:  # its worker died: what it left on this machine (its child, Ray folder, scratch) goes
                self._local_cleanup(state.where)
            out.append(done)
            del self.running[gen]
        return out

    def close(self, grace_s: float = 4.0) -> list[Any]:
        """Cancel the running tasks, end Ray, and return the keys of the tasks that were cancelled.

        Each task is first asked to stop (``KeyboardInterrupt`` in its worker), so that it kills its
        child's process group and removes its scratch folder itself (:func:`.trial.trial_task`); after
        ``grace_s`` what still runs is force-cancelled (its worker killed), and once it has ended the
        tuner removes what a task on this machine left: its child's process group and its scratch folder.
        The wait is for the tasks' ends, never for a stream's next item (a cancelled stream may stop
        mid-way, or wait on its back-pressure, and a read of it would never return), and a stream is
        read only once its task has ended (see :meth:`_learn_where`).
        """
        if self._session is None:  # closed already
            return []
        cancelled = [state.key for state in self.running.values()]
        for gen in list(self.running):
            try:
                self._ray.cancel(gen, force=False)
            except Exception:  # already gone with its node
                pass
        ends = {gen.completed(): gen for gen in self.running}
        ended = self._ended(list(ends), grace_s)
        late = [end for end in ends if end not in ended]
        for end in late:  # still running after the grace: its worker is killed
            with contextlib.suppress(Exception):
                self._ray.cancel(ends[end], force=True)
        if late:
            ended |= self._ended(late, FORCED_END_S)
        for end, gen in ends.items():
            state = self.running[gen]
            if end in ended:  # a stream is read only once its task has ended: a read before may block for good
                self._learn_where(gen, state)
            self._local_cleanup(state.where)
        self.running.clear()
        self._session.close()  # a private instance stops (its folder removed), a cluster is left
        self._session = None
        return cancelled

    def _ended(self, ends: list[Any], timeout: float) -> set[Any]:
        """The tasks' completion refs among ``ends`` that are ready within ``timeout``."""
        if not ends:
            return set()
        with contextlib.suppress(Exception):
            return set(self._ray.wait(ends, num_returns=len(ends), timeout=timeout, fetch_local=False)[0])
        return set()

    def _learn_where(self, gen: Any, state: _Running, most: int = 8) -> None:
        """Where a cancelled task that has ended started, from a start event not read yet (reading only what is
        ready). Only for an ended task: Ray's ``next_ready`` waits for the task's end once its stream is
        marked finished (as a cancel marks it), so a task that ignored its cancel would block it."""
        for _ in range(most):
            if state.where:
                return
            try:
                if not gen.next_ready():
                    return
                item = self._ray.get(next(gen), timeout=1.0)
            except Exception:  # its stream has ended or failed
                return
            if isinstance(item, dict) and item.get("event") == "start":
                state.where = {k: v for k, v in item.items() if k != "event"}

    @staticmethod
    def _local_cleanup(where: dict[str, Any]) -> None:
        """What a task killed on this machine may have left: its child's process group, its scratch folder."""
        from .child import cleanup_work_dir

        if where.get("host") == socket.gethostname() and where.get("work_dir"):
            cleanup_work_dir(Path(where["work_dir"]))
