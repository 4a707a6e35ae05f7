"""One trial runner for studies and sweeps: launch, wait, classify, retry, stop.

The split is Ray Tune's, between a searcher and the controller. A *source*
decides what runs and hears what came of it: the study asks Optuna's
NSGA-II sampler and tells it the scores (:mod:`.study`), a sweep walks its
list of cells (:mod:`.sweep`). The :class:`TrialRunner` owns the
:class:`~.pool.TrialPool`, the event log and the one policy on what an
ended trial means:

* **complete**: it returned its scores; the source records them.
* **diverged**: its training produced a non-finite loss (its error says a
  member ``diverged``). That is an outcome of its hyperparameters: the same
  ones would diverge again, so it is not run again and does not count as a
  failure.
* **lost**: its worker, its node or the transfer of its run directory
  failed, and the trial itself did not raise. It is run again, and counts.
* **failed**: the trial raised. It is not run again, and counts.

More than ``max_failures`` lost or failed trials stop the run with
:class:`TooManyFailures`, one line that names the last of them. However the
run ends (its last trial, that error, Ctrl-C, SIGTERM), the trials still
running are cancelled: each kills its child's process group and removes
its scratch folder (:mod:`.child`), the log records them as ``cancelled``,
and the source hears of each at once (a study marks it failed, of kind
``cancelled``, and queues its parameters again).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import one_line
from ..interrupt import OneLineFailure, deferred
from .pool import EventLog, Finished, TrialPool, short_node

__all__ = ["Launch", "TooManyFailures", "TrialRunner", "TrialSource", "is_divergence"]

log = logging.getLogger("fedrobust")


class TooManyFailures(OneLineFailure):
    """More trials were lost or failed than the run's ``max_failures`` allows; the message is one line."""


def is_divergence(error: BaseException) -> bool:
    """Whether a trial failed because its training diverged (a non-finite loss): a
    :class:`~fedrobust.training.DivergedError`, or one carried as the cause of another error (a Ray task's).
    Never the word in a message: a malformed node reply's message may hold it too."""
    from ..training import DivergedError

    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, DivergedError):
            return True
        error = getattr(error, "cause", None) or error.__cause__
        seen += 1
    return False


@dataclass
class Launch:
    """One trial to run: ``key`` identifies it to its source, ``name`` is its run directory's name."""

    key: Any
    name: str
    dest: Path  # where the tuner writes its run directory
    values: dict[str, Any] = field(default_factory=dict)  # config keys changed from the base config
    cfg_yaml: str = ""  # the base config, as YAML
    label: str = ""  # for messages: "trial 3", "cell lr-0.1"
    fidelity: dict[str, int] | None = None  # a multi-fidelity study's budget: rung, rungs, epochs, images
    resume: Path | None = None  # the checkpoint a promoted trial resumes (resume.CHECKPOINT of its last rung)
    promotion: tuple[int, int] | None = None  # (trial number, rung) of a promoted trial


class TrialSource(Protocol):
    """What a study or a sweep gives the runner (Ray Tune's Searcher, in its own terms)."""

    def next(self, running: int) -> Launch | None:
        """The next trial to launch now (``running`` are in flight), or None."""

    def finished(self) -> bool:
        """Whether nothing more is to be launched (the runner still waits for the running ones)."""

    def started(self, launch: Launch, where: dict[str, Any]) -> None: ...

    def completed(self, launch: Launch, scores: dict[str, Any], where: dict[str, Any]) -> None: ...

    def failed(self, launch: Launch, reason: str, kind: str, where: dict[str, Any]) -> None:
        """``kind`` is ``lost`` (the runner then calls :meth:`retry`), ``diverged`` or ``error``."""

    def retry(self, launch: Launch) -> None:
        """Queue ``launch`` again (it was lost with its worker)."""

    def cancelled(self, launch: Launch) -> None:
        """``launch`` was stopped before it ended (the run is ending); the source records it."""


class TrialRunner:
    """Runs a source's trials on a pool under the policy above; the pool is closed when :meth:`run` returns."""

    def __init__(self, pool: TrialPool, source: TrialSource, events: EventLog, *, max_failures: int,
                 failures_key: str, threads: int, artefacts: dict[str, Any] | None) -> None:
        self.pool, self.source, self.events = pool, source, events
        self.max_failures, self.failures_key = max_failures, failures_key
        self.threads, self.artefacts = threads, artefacts
        self.launches: dict[Any, Launch] = {}
        self.failures = 0
        self.counts = {"complete": 0, "diverged": 0, "lost": 0, "error": 0}
        pool.on_start = self._started

    def run(self) -> None:
        try:
            # Each step that changes the books (a trial asked and launched, an ended one received and
            # recorded) is done whole before a signal is taken, so that the stop finds every trial
            # either running (and cancels it) or recorded.
            while self.pool.running or not self.source.finished():
                while self.pool.free > 0:
                    with deferred():
                        launch = self.source.next(len(self.pool.running))
                        if launch is None:
                            break
                        self.launches[launch.key] = launch
                        extra = {}
                        if launch.fidelity is not None:
                            extra["fidelity"] = launch.fidelity
                        if launch.resume is not None:  # through the object store: the trial may run elsewhere
                            extra["resume"] = self.pool.put(launch.resume.read_bytes())
                        self.pool.submit(launch.key, launch.dest, launch.cfg_yaml, launch.values, launch.name,
                                         self.threads, self.artefacts, **extra)
                if not self.pool.running:
                    raise RuntimeError("the trial source has work left but launched none")
                with deferred() as held:
                    for done in self.pool.wait(held=held):
                        self._ended(done)
        finally:
            for key in self.pool.close():
                launch = self.launches.pop(key, None)
                self.events.write("cancelled", key)
                if launch is not None:
                    self.source.cancelled(launch)
                    log.info("%s cancelled: its processes were stopped and its scratch folder removed", launch.label)

    @property
    def running(self) -> int:
        return len(self.pool.running)

    def _started(self, key: Any, where: dict[str, Any]) -> None:
        launch = self.launches[key]
        self.events.write("start", key, node=short_node(where), **where)
        self.source.started(launch, where)

    def _ended(self, done: Finished) -> None:
        launch = self.launches.pop(done.key)
        node = short_node(done.where)
        if done.error is None:
            self.counts["complete"] += 1
            self.events.write("end", done.key, node=node)
            self.source.completed(launch, done.scores or {}, done.where)
            return
        reason = one_line(done.error)[:500]
        kind = "lost" if done.lost else "diverged" if is_divergence(done.error) else "error"
        self.counts[kind] += 1
        self.events.write("lost" if kind == "lost" else "fail", done.key, node=node, error=reason[:300],
                          **({"diverged": True} if kind == "diverged" else {}))
        self.source.failed(launch, reason, kind, done.where)
        if kind == "diverged":
            log.warning("%s diverged (failed, not run again, not counted in %s): %s", launch.label,
                        self.failures_key, reason[:300])
            return
        self.failures += 1
        if kind == "lost":
            log.warning("%s lost with its worker on %s (%s); run again", launch.label, node or "an unknown node",
                        reason[:200])
        else:
            log.warning("%s failed: %s", launch.label, reason[:300])
        if self.failures > self.max_failures:
            what = "lost with its worker" if kind == "lost" else "failed"
            raise TooManyFailures(
                f"{self.failures} trial(s) failed or were lost ({self.failures_key}={self.max_failures}); "
                f"the last, {launch.label}, {what}: {reason[:300]}")
        if kind == "lost":
            self.source.retry(launch)
