"""SIGINT and SIGTERM end a command with one line and the shell's exit code.

The command line installs :func:`install`, which turns both signals into an
:class:`Interrupted` exception in the main thread. Each command catches it,
says what it kept, and exits with ``128 + signum`` (130 for SIGINT, 143 for
SIGTERM). Files are written atomically (:mod:`fedrobust.atomic`), so an
interruption leaves every file whole.

``ray.init`` replaces the SIGTERM handler with ``sys.exit(15)``; a
``SystemExit(15)`` is therefore read as SIGTERM too (:func:`as_interrupt`),
and code that starts Ray in the main thread keeps our handlers (:func:`keep_handlers`).

A command whose runtime cannot be wound down in time (threads blocked in
Ray, Flower's simulation threads) ends with :func:`exit_now` once it has
said what it kept: logs flushed, the processes it started killed, then
``os._exit``, so no interpreter shutdown joins a blocked thread or tears down
Ray's C++ core under it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

__all__ = ["Interrupted", "OneLineFailure", "as_interrupt", "descendants", "exit_now", "guarded", "install",
           "keep_handlers", "kill_processes"]


class Interrupted(BaseException):
    """The process was asked to stop by ``signum``. A BaseException, like KeyboardInterrupt."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(self.name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum, frame) -> None:
    # a second signal ends the process at once, as it would without us (files stay whole: atomic writes)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Interrupted(signum)


def install() -> None:
    """Raise :class:`Interrupted` on SIGINT and SIGTERM (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _raise)
        signal.signal(signal.SIGTERM, _raise)


@contextlib.contextmanager
def keep_handlers() -> Iterator[None]:
    """Restore the SIGINT and SIGTERM handlers after the block (around ``ray.init``, which replaces them)."""
    main = threading.current_thread() is threading.main_thread()
    saved = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) if main else None
    try:
        yield
    finally:
        if saved is not None:
            signal.signal(signal.SIGINT, saved[0])
            signal.signal(signal.SIGTERM, saved[1])


def as_interrupt(exc: BaseException | None) -> Interrupted | None:
    """``exc`` as an :class:`Interrupted`, if it is one in disguise.

    KeyboardInterrupt, Ray's SystemExit(15), and any error whose cause or
    context is one of these: a signal that lands inside a C extension (Ray's
    ``CoreWorker.wait``) comes out as ``SystemError: ... returned a result
    with an exception set``, with the interruption as its cause.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Interrupted):
            return exc
        if isinstance(exc, KeyboardInterrupt):
            return Interrupted(signal.SIGINT)
        if isinstance(exc, SystemExit) and exc.code == signal.SIGTERM:
            return Interrupted(signal.SIGTERM)
        exc = exc.__cause__ or exc.__context__
    return None


class OneLineFailure(RuntimeError):
    """A failure whose message is one line that says it all: :func:`guarded` prints it and exits 1."""


def guarded(fn: Callable[[], int], kept: str, prog: str = "fedrobust") -> int:
    """Run a command with the handlers installed (and restored after): a :class:`ConfigError` exits 2,
    a :class:`OneLineFailure` 1, and an interruption ``128 + signum``, each with one line on stderr
    (for an interruption, saying what was kept)."""
    from .config import ConfigError

    saved = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    install()
    try:
        return fn()
    except (ConfigError, OneLineFailure) as exc:
        print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except BaseException as exc:
        intr = as_interrupt(exc)
        if intr is None:
            raise
        print(f"{prog}: interrupted ({intr.name}); {kept}", file=sys.stderr)
        return intr.exit_code
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, saved[0])
            signal.signal(signal.SIGTERM, saved[1])


def _stat(pid: int) -> tuple[str, int]:
    """A process's state letter and parent id (``("", 0)`` when it is gone)."""
    try:  # the command may contain ")" or spaces: the fields after the last ")" are fixed
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, ValueError, IndexError):
        return "", 0


def descendants(pid: int | None = None) -> list[int]:
    """Live processes (not zombies) whose parent chain leads to ``pid`` (default: this process), read
    from ``/proc``; empty where there is no ``/proc``."""
    pid = os.getpid() if pid is None else pid
    try:
        entries = [int(e) for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    children: dict[int, list[int]] = {}
    for p in entries:
        state, ppid = _stat(p)
        if ppid and state != "Z":  # a zombie's children have a new parent already
            children.setdefault(ppid, []).append(p)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_processes(pids: list[int], wait_s: float = 2.0) -> None:
    """SIGKILL each of ``pids`` (by id; gone ones are skipped), and reap those that are this process's
    children, waiting at most ``wait_s``."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    mine = [pid for pid in pids if _stat(pid)[1] == os.getpid()]
    deadline = time.monotonic() + wait_s
    while mine and time.monotonic() < deadline:
        for pid in list(mine):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            except OSError:  # reaped elsewhere
                pass
            mine.remove(pid)
        if mine:
            time.sleep(0.02)


def exit_now(code: int) -> NoReturn:
    """End the process with ``code`` at once: flush the logs and standard streams, kill every process
    it started (by id), then ``os._exit``: no atexit hook runs and no thread is joined."""
    with contextlib.suppress(Exception):
        logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        kill_processes(descendants())
    os._exit(code)
