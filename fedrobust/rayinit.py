"""Start or join Ray for this process from a thread of its own, and end it for sure.

``ray.init`` in the main thread replaces the SIGTERM handler with its own
(``sys.exit``), and starts Ray's services through ``preexec_fn``, whose at-fork
hooks run Python code where a signal handler's exception is swallowed. Here
``ray.init`` runs in an owner thread: Ray installs no Python signal handler
outside the main thread, and nothing it forks runs hooks in the main thread,
which only waits on an event, in Python, where a signal is taken at once.
Ray's C++ core would also install a failure handler for SIGTERM in this
process (it prints a stack and aborts); Ray's own switch for it
(``RAY_DISABLE_FAILURE_SIGNAL_HANDLER``) is turned on for this call only, so
that SIGTERM stays ours (Ray's worker processes keep theirs). If a signal
comes while Ray starts, the start is let finish (Ray must not be shut down
while another thread is inside it), Ray is shut down, and the interruption
goes on.

The owner thread lives until :meth:`RaySession.close`: Ray asks the kernel
to kill its services when the *thread* that started them ends
(``PR_SET_PDEATHSIG``), so it must outlive them; when the process ends,
however it ends, they end with it.

A private local instance gets a temporary folder of its own (short: Ray's
socket paths must fit 107 bytes), removed on close, so that no run leaves
Ray's session folders behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import warnings
from typing import Any

from .interrupt import deferred

__all__ = ["RaySession", "private_temp_dir", "start_ray"]


def private_temp_dir() -> str:
    """A new, short folder for a private Ray instance's session files, under ``$RAY_TMPDIR`` or /tmp."""
    base = os.environ.get("RAY_TMPDIR") or "/tmp"
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix="fr-ray-", dir=base)


class _NotMainThreadNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "not the main thread" not in record.getMessage()


class RaySession:
    """Ray as this process started or joined it: :meth:`close` shuts it down (a private instance stops,
    a cluster is left) and removes the private instance's folder."""

    def __init__(self, owner: threading.Thread | None, release: threading.Event, temp_dir: str | None,
                 started: bool) -> None:
        self._owner, self._release, self.temp_dir, self.started = owner, release, temp_dir, started

    def close(self) -> None:
        import ray

        from .sessions import descendants, end_processes

        with deferred():  # Ray is shut down and its folder removed whole before a signal is taken
            # Ray's processes, named now: its agents outlive the raylet that started them for a moment,
            # writing to the folder, and are no one's descendants once it has gone
            ours = descendants() if self.temp_dir else []
            try:
                if self.started and ray.is_initialized():
                    ray.shutdown()
            finally:
                self._release.set()
                if self._owner is not None and self._owner.ident is not None:
                    self._owner.join(timeout=5.0)
                if self.temp_dir:
                    end_processes(ours, wait_s=0.5)  # Ray has asked them to stop: what is left is killed
                    shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray(**init_args: Any) -> RaySession:
    """``ray.init(**init_args)`` in an owner thread (see the module docstring); a no-op session if Ray is
    already initialised in this process. ``address="local"`` without ``_temp_dir`` gets a private folder.

    Call it as ``with deferred(): session = start_ray(...)``, so that a signal during the start (a few
    seconds for a local instance) is taken once the session is held, and nothing is left to chance."""
    import ray

    release = threading.Event()
    if ray.is_initialized():
        return RaySession(None, release, None, started=False)
    warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning)
    started = threading.Event()
    failure: list[BaseException] = []

    def own() -> None:
        from ray._private import ray_constants

        notice = _NotMainThreadNotice()
        logging.getLogger("ray._private.worker").addFilter(notice)
        handler_was = ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read while the core worker starts
        try:
            ray.init(**init_args)
        except BaseException as exc:
            failure.append(exc)
        finally:
            ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = handler_was
            logging.getLogger("ray._private.worker").removeFilter(notice)
            started.set()
        release.wait()

    owner = threading.Thread(target=own, name="ray-owner", daemon=True)
    session = RaySession(owner, release, None, started=True)
    try:
        with deferred():  # the folder is held by the session before a signal is taken
            if init_args.get("address") == "local" and "_temp_dir" not in init_args:
                session.temp_dir = init_args["_temp_dir"] = private_temp_dir()
            owner.start()
        while not started.wait(0.1):
            pass
    except BaseException:
        # interrupted while Ray starts: let the start finish (a second signal ends the process at once)
        while owner.is_alive() and not started.is_set():
            with contextlib.suppress(BaseException):
                started.wait(0.1)
        session.close()
        raise
    if failure:
        session.close()
        raise failure[0]
    return session
