"""A trial's child process, in a session of its own, and how it is stopped with everything it started.

A trial on the simulation engine runs ``python -m fedrobust.tuning.simulate``,
which starts a private Ray instance (GCS server, raylet, workers). The child is
started with ``start_new_session=True``, so it and every process it starts,
Ray's included (Ray starts them in its driver's process group), share one
process group whose id is the child's pid. Stopping a trial is one
``killpg``: SIGTERM first, so the child can end its Ray itself, then SIGKILL
for whatever is left after a grace period.

The child also asks the kernel for SIGTERM when the thread that started it
dies (``PR_SET_PDEATHSIG``, :func:`die_with_parent`): a Ray worker killed outright (a forced cancel, a
lost node) takes its trial's child with it. Its pid is written next to the
trial's scratch folder (``child.pid``) so that the tuner, when the trial ran
on its own machine, can stop the group even after the worker is gone.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["PID_FILE", "cleanup_work_dir", "die_with_parent", "run_in_session", "stop_group"]

PID_FILE = "child.pid"


PARENT_ENV = "FEDROBUST_TRIAL_PARENT"


def die_with_parent() -> None:
    """In the child: SIGTERM when the parent that started it dies; exit at once if it already has.

    Called by the child itself (not in ``preexec_fn``, which is unsafe in a threaded Ray worker).
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before the request above was made
        sys.exit(128 + signal.SIGTERM)


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # the id was reused by someone else's group: not ours
        return False


def stop_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM to the process group ``pgid``, then SIGKILL to what is left after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:  # reap the group's leader if it is our child, so that it does not linger as a zombie
                os.waitpid(pgid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _alive(pgid):
                return
            time.sleep(0.05)


def run_in_session(cmd: list[str], *, env: dict[str, str], log_path: Path, pid_path: Path | None = None,
                   poll_s: float = 0.2) -> int:
    """Run ``cmd`` in a new session, output to ``log_path``; return its exit code.

    Whatever ends the wait (a KeyboardInterrupt from a Ray cancel, SIGTERM, any error) stops the
    child's whole process group before it propagates. The wait polls, so that an interruption is
    raised within ``poll_s``.
    """
    env = {**env, PARENT_ENV: str(os.getpid())}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        if pid_path is not None:
            pid_path.write_text(str(proc.pid))
        while proc.poll() is None:
            time.sleep(poll_s)
    except BaseException:
        stop_group(proc.pid)
        raise
    finally:
        if _alive(proc.pid):  # the child ended but left processes in its group
            stop_group(proc.pid, grace_s=2.0)
        if pid_path is not None:
            pid_path.unlink(missing_ok=True)
    return proc.returncode


def cleanup_work_dir(work: Path) -> None:
    """Stop the child recorded in ``work``/child.pid (if any), then remove the scratch folder ``work``.

    Only a folder directly under this machine's scratch root is removed.
    """
    from .remote import scratch_root

    work = Path(work)
    try:
        pid = int((work / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        pid = None
    if pid is not None and pid > 1:
        stop_group(pid)
    if work.parent.resolve() == scratch_root().resolve():
        shutil.rmtree(work, ignore_errors=True)
