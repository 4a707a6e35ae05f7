"""Ray for this process: a private instance in a child process, joined from a thread of its own, ended for sure.

A private local instance (``address="local"``) is started by
``python -m fedrobust.rayhead``, a child process of its own session
(:mod:`fedrobust.sessions`), while this process's main thread waits on a pipe
in plain Python. Starting Ray takes seconds (3 to 8 on two cores); a signal in
that time is taken at once: one SIGKILL to the child's process group ends
the half-started instance, its services and workers together, and its folder
is removed. Nothing waits for the start to finish, and nothing of Ray runs in
this process yet to race with.

Once the instance is up, this process connects to it as a driver (or to a
cluster, for ``address=HOST:PORT``): ``ray.init`` runs in an owner thread,
where Ray installs no Python signal handler and no at-fork hook runs in the
main thread, which only waits on an event, in Python, where a signal is taken
at once. Ray's C++ core would also install a failure handler for SIGTERM in
this process (it prints a stack and aborts); Ray's own switch for it
(``RAY_DISABLE_FAILURE_SIGNAL_HANDLER``) is turned on for this call only. If
a signal comes while the driver connects (half a second), the connection is
let finish (Ray must not be shut down while another thread is inside it),
then everything is closed, and the interruption goes on. The owner thread
lives until :meth:`RaySession.close` (Ray asks the kernel to end what a
thread started when that thread ends).

A session is created first and started second (:meth:`RaySession.start`), so
that its holder can close it at any moment of the start: every resource (the
folder, the child, the pipe, the thread) is recorded on the session before
a signal can be taken, and :meth:`RaySession.close` ends whatever is there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Any

from .interrupt import deferred, hold

__all__ = ["RaySession", "private_temp_dir"]

log = logging.getLogger("fedrobust")


def private_temp_dir() -> str:
    """A new, short folder for a private Ray instance's session files, under ``$RAY_TMPDIR`` or /tmp."""
    base = os.environ.get("RAY_TMPDIR") or "/tmp"
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix="fr-ray-", dir=base)


class _NotMainThreadNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "not the main thread" not in record.getMessage()


# ray.init's arguments that shape a new instance (the head child takes them); the rest is the driver's too
_INSTANCE_ARGS = ("num_cpus", "num_gpus", "resources", "object_store_memory", "include_dashboard", "_system_config")
HEAD_START_S = 180.0  # longest wait for a private instance to come up


class RaySession:
    """Ray as this process started or joined it (:meth:`start`); :meth:`close` ends a private instance
    (its child's process group killed, its folder removed) or leaves a cluster, at any moment."""

    def __init__(self) -> None:
        self.temp_dir: str | None = None
        self.started = False  # this process connected a driver (and must disconnect it)
        self._head: subprocess.Popen | None = None
        self._ready: int | None = None
        self._owner: threading.Thread | None = None
        self._release = threading.Event()

    def start(self, **init_args: Any) -> RaySession:
        """``ray.init(**init_args)``, as the module docstring says; a no-op if Ray is already initialised
        in this process. On any exception (an interruption included) what was started is ended first."""
        import ray

        if ray.is_initialized():
            return self
        warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning)
        try:
            if init_args.get("address") == "local":
                address = self._start_head({k: v for k, v in init_args.items() if k != "address"})
                init_args = {k: v for k, v in init_args.items() if k not in _INSTANCE_ARGS} | {"address": address}
            self._connect(init_args)
        except BaseException:
            self.close()
            raise
        return self

    def _start_head(self, init_args: dict[str, Any]) -> str:
        """The private instance's GCS address, once its child says it is up (signals taken meanwhile)."""
        from .sessions import end_group, ended, import_path, spawn

        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env |= {"PYTHONPATH": import_path(), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
        with deferred():  # the folder, the pipe and the child are held by the session before a signal is taken
            self.temp_dir = private_temp_dir()
            self._ready, ready_w = os.pipe()
            try:
                with open(os.path.join(self.temp_dir, "head.log"), "wb") as out:
                    self._head = spawn([sys.executable, "-m", "fedrobust.rayhead", str(ready_w)], env=env,
                                       stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                       pass_fds=(ready_w,))
            finally:
                os.close(ready_w)
        with contextlib.suppress(BrokenPipeError):  # a child that died at once says why on the pipe
            self._head.stdin.write(json.dumps({**init_args, "_temp_dir": self.temp_dir}).encode())
            self._head.stdin.close()
        said, reply = b"", None
        deadline = time.monotonic() + HEAD_START_S
        while reply is None:  # in short waits: a signal's handler runs between them
            readable, _, _ = select.select([self._ready], [], [], 0.1)
            if readable:
                chunk = os.read(self._ready, 65536)
                said += chunk
                reply = _whole_json(said)
                if not chunk:
                    break
            elif ended(self._head) or time.monotonic() > deadline:
                break
        reply = reply or {}
        if "address" in reply:
            return reply["address"]
        timed_out = not ended(self._head)
        code = end_group(self._head, settle_s=2.0)
        self._head = None
        log.debug("Ray's head process said:\n%s", _tail(os.path.join(self.temp_dir, "head.log")))
        why = reply.get("error") or (f"it did not come up within {HEAD_START_S:.0f} s" if timed_out else
                                     f"its process ended (exit code {code}) without saying why")
        raise RuntimeError(f"a private Ray instance did not start: {why}")

    def _connect(self, init_args: dict[str, Any]) -> None:
        """``ray.init`` as a driver, in the owner thread; a signal meanwhile is taken once it has returned."""
        import ray

        connected = threading.Event()
        failure: list[BaseException] = []
        release = self._release

        def own() -> None:
            from ray._private import ray_constants

            notice = _NotMainThreadNotice()
            logging.getLogger("ray._private.worker").addFilter(notice)
            handler_was = ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
            ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True  # read while the core worker starts
            try:
                hold("ray-connecting")  # test hook: the driver is about to connect
                ray.init(**init_args)
            except BaseException as exc:
                failure.append(exc)
            finally:
                ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = handler_was
                logging.getLogger("ray._private.worker").removeFilter(notice)
                connected.set()
            release.wait()

        with deferred():
            self._owner = threading.Thread(target=own, name="ray-owner", daemon=True)
            self.started = True
            self._owner.start()
        try:
            while not connected.wait(0.1):
                pass
        except BaseException:
            # interrupted while the driver connects: let it finish (a second signal ends the process at once)
            while self._owner.is_alive() and not connected.is_set():
                with contextlib.suppress(BaseException):
                    connected.wait(0.1)
            raise
        if failure:
            raise failure[0]

    def close(self) -> None:
        """Disconnect this process's driver, end the private instance and remove its folder: whatever of
        them :meth:`start` got to. A no-op the second time."""
        from .sessions import end_group

        with deferred():  # all of it, before a signal is taken
            try:
                if self.started:
                    import ray

                    if ray.is_initialized():
                        ray.shutdown()
            finally:
                self.started = False
                self._release.set()
                if self._owner is not None and self._owner.ident is not None:
                    self._owner.join(timeout=5.0)
                self._owner = None
                if self._head is not None:
                    end_group(self._head, settle_s=2.0)  # its services and workers are in its group
                    self._head = None
                if self._ready is not None:
                    os.close(self._ready)
                    self._ready = None
                if self.temp_dir:
                    shutil.rmtree(self.temp_dir, ignore_errors=True)
                    self.temp_dir = None


def _whole_json(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _tail(path: str, size: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
