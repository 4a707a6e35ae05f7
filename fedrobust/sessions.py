"""Child processes in a session of their own, ended with everything they started.

A child started with :func:`spawn` leads a new session and process group;
whatever it starts joins that group unless it leaves it (Ray's services and
workers do not), so one ``killpg`` ends them all at once, and none of them is
left running to react to the others' death. The group is killed while the
child is still unreaped (:func:`ended` looks without reaping), so that its id
cannot have been given to another process meanwhile.

The child asks the kernel for SIGKILL when the thread that started it ends
(:func:`die_with_parent`), so that it never outlives a parent that was killed
outright.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

__all__ = ["PARENT_ENV", "descendants", "die_with_parent", "end_group", "ended", "end_processes", "import_path",
           "spawn", "stop_group"]

PARENT_ENV = "FEDROBUST_PARENT"


def import_path() -> str:
    """This process's import path, once each entry: a child (and Ray's workers) import what it imports."""
    entries = [*sys.path, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    return os.pathsep.join(dict.fromkeys(e for e in entries if e))


def spawn(cmd: Sequence[str], *, env: dict[str, str], **popen: object) -> subprocess.Popen:
    """Start ``cmd`` in a new session. Call it inside :func:`fedrobust.interrupt.deferred`, binding the
    handle there, so that a signal meanwhile is taken only once the caller holds it."""
    return subprocess.Popen(list(cmd), env={**env, PARENT_ENV: str(os.getpid())}, start_new_session=True, **popen)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In the child: ``sig`` when the parent's thread that started it ends; exit now if it already has."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the parent died before the request above was made
        os._exit(128 + sig)


def ended(proc: subprocess.Popen) -> bool:
    """Whether ``proc`` has ended, without reaping it (its id stays reserved until :func:`end_group`)."""
    if proc.returncode is not None:
        return True
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def end_group(proc: subprocess.Popen, settle_s: float = 0.0) -> int:
    """SIGKILL to ``proc``'s whole process group (it leads it), then reap it and close its pipes; its
    exit code. ``settle_s``: wait up to that long for the group's other members to have gone too
    (a folder they write to is then removed after them, not before)."""
    if proc.returncode is None:  # unreaped: the group id is still ours
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    code = proc.wait()
    deadline = time.monotonic() + settle_s
    while settle_s and _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    return code


def stop_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM to the process group ``pgid`` (not this process's child), then SIGKILL to what is left
    after ``grace_s``: for a group known only by the id its leader recorded."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):  # gone, or the id now belongs to someone else
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:  # reap the leader if it is our child, so that it does not linger as a zombie
                os.waitpid(pgid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _group_alive(pgid):  # zombies waiting for their reaper do not count
                return
            time.sleep(0.05)


def _live() -> dict[int, tuple[int, int]] | None:
    """Every live (not zombie) process's parent and process group, read from ``/proc``; None where there is
    no ``/proc`` to read."""
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    found = {}
    for pid in entries:
        try:  # the command may hold ")" or spaces: the fields after the last ")" are fixed
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            found[pid] = (int(fields[1]), int(fields[2]))
    return found


def _parents() -> dict[int, int]:
    """Every live (not zombie) process's parent (empty where there is no ``/proc``)."""
    return {pid: parent for pid, (parent, _) in (_live() or {}).items()}


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of the group ``pgid`` is left (without ``/proc``: whether the
    group can be signalled, zombies included)."""
    live = _live()
    if live is None:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    return any(group == pgid for _, group in live.values())


def descendants(pid: int | None = None) -> list[int]:
    """The live processes whose parent chain leads to ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def end_processes(pids: list[int], wait_s: float = 5.0) -> None:
    """Wait up to ``wait_s`` for ``pids`` to end (a process whose parent died is no one's descendant any
    more, so they are named beforehand), then SIGKILL what is left, and reap those that are ours."""
    deadline = time.monotonic() + wait_s
    while (alive := [p for p in pids if p in _parents()]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.waitpid(pid, os.WNOHANG)
