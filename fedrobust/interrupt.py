"""SIGINT and SIGTERM end a command with one line and the shell's exit code, at any moment.

The command line installs :func:`install` as the first thing it does (before
it imports the config, torch, Flower or Ray), which turns both signals into an
:class:`Interrupted` exception in the main thread. Each command catches it,
says what it kept, and exits with ``128 + signum`` (130 for SIGINT, 143 for
SIGTERM). Files are written atomically (:mod:`fedrobust.atomic`), so an
interruption leaves every file whole.

Why a stop is correct by construction, window by window:

* **Start-up.** The handlers are installed within milliseconds of the
  interpreter's start, whatever the signals' inherited disposition (a
  background job of a script starts with SIGINT ignored; it is honoured here
  from the first moment, not only once the command is running). Before that,
  Python itself is starting: SIGTERM ends the process by its default action,
  and so does SIGINT until Python's own handler is in place; nothing has been
  written or started then.
* **Ray never runs in the process that takes the signals.** Ray replaces the
  SIGTERM handler inside ``ray.init``, starts its services from at-fork hooks
  where an exception is swallowed, and ends the process from C++ when it is
  called after ``ray.shutdown``. So the simulation engine runs Flower and Ray in
  a child process of its own session (:func:`fedrobust.engines.run_simulation`)
  that takes no signal: the command's main thread waits on it in plain Python,
  and on a signal kills the child's whole process group in one ``killpg``,
  so no thread of Flower or Ray is left to race with. Where a command needs
  Ray itself (the tuner's trial pool, the loss search's fitness), a private
  instance starts in a child process of its own session too
  (:mod:`fedrobust.rayhead`): a signal while it starts (seconds) kills its
  group at once, without waiting for the start. Only then does this process
  connect to it as a driver, from a thread of its own
  (:mod:`fedrobust.rayinit`): Ray installs no handler there, and no at-fork
  hook runs in the main thread; a signal during that half second is held
  until the connection is made, then everything is closed.
* **Swallowed interruptions are delivered again.** A Python signal handler
  runs between two bytecodes of the main thread, which can be inside a
  finaliser or an at-fork hook, where an exception cannot propagate and is
  only reported as "unraisable". :func:`install` also installs an unraisable
  hook that delivers such an interruption again (``_thread.interrupt_main``)
  instead of printing it, so the first signal is never lost.
* **Critical sections.** :func:`deferred` holds a signal that arrives while a
  step must be done whole, and delivers it when the step ends: a temporary
  file named (:mod:`fedrobust.atomic`), a run directory created and marked
  INCOMPLETE, a child process started and its handle bound, Ray started or
  shut down with its folder, a study's books changed (a trial asked,
  launched, received, told). A stop therefore finds every resource held by
  someone who cleans it up. A simulation's wind-down (killing the child's
  group, removing its Ray folder) is not cut short by a second signal.
* **After the command.** The command line's own process ignores signals once
  the command has returned, while the interpreter shuts down, so that its
  exit code says what the command did.

Otherwise a second signal, once the first is being handled, ends the process
at once by its default action, as it would without us (files stay whole).

:func:`hold` is a test hook: it pauses a command at a named point while
``FEDROBUST_HOLD`` names it, so that a test signals it at exactly that moment.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import ConfigError, OneLineFailure, one_line

__all__ = ["HOLD_DIR_ENV", "HOLD_ENV", "Held", "Interrupted", "OneLineFailure", "as_interrupt", "deferred", "guarded",
           "hold", "install"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


# The first signal this process took since install(), and whether it is being delivered again.
_first: int | None = None
_again = False


def _on_signal(signum: int, frame) -> None:
    global _first, _again
    if _first is None or _again:
        _first = signum if _first is None else _first
        _again = False
        raise Interrupted(_first)
    _end_at_once(signum)


def _end_at_once(signum: int) -> None:
    """A second signal: its default action, at once (nothing is half-written: atomic writes)."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


_in_hook = False  # the main thread is inside _on_unraisable


def _redeliver(signum: int) -> None:
    while _in_hook:  # trip the signal only once the hook has returned (a loaded machine may keep it there)
        time.sleep(0.001)
    _thread.interrupt_main(signum)


def _on_unraisable(unraisable) -> None:
    """An interruption raised where it cannot propagate (a finaliser, an at-fork hook) is delivered
    again to the main thread, instead of being printed and lost.

    Not from inside this hook: ``_thread.interrupt_main`` trips the signal, and Python runs its handler
    as soon as the call returns, still inside the hook, where the handler's exception is printed and
    dropped ("Exception ignored in sys.unraisablehook": the stop was lost). A helper thread trips it once
    the hook has returned (``_in_hook`` cleared: the main thread lets no other thread run between that
    and its return), so the handler runs in the main thread's own code."""
    global _again, _in_hook
    intr = as_interrupt(unraisable.exc_value)
    if intr is not None and threading.current_thread() is threading.main_thread():
        _again = intr.signum == _first
        _in_hook = True
        try:
            threading.Thread(target=_redeliver, args=(intr.signum,), name="fedrobust-redeliver", daemon=True).start()
        except RuntimeError:  # no new thread at interpreter shutdown: deliver it from here, as best it can be
            _in_hook = False
            _thread.interrupt_main(intr.signum)
        _in_hook = False  # the last bytecode that can let another thread run before the hook returns
        return
    sys.__unraisablehook__(unraisable)


def install() -> None:
    """Raise :class:`Interrupted` on SIGINT and SIGTERM, and deliver again an interruption that
    was swallowed (main thread only; elsewhere a no-op)."""
    global _first, _again
    if threading.current_thread() is threading.main_thread():
        _first, _again = None, False
        for signum in SIGNALS:
            signal.signal(signum, _on_signal)
        sys.unraisablehook = _on_unraisable


class Held:
    """The signals a :func:`deferred` block holds (``pending``: one came), so that a long wait inside the
    block can end early and let it be taken."""

    def __init__(self) -> None:
        self.signals: list[int] = []

    @property
    def pending(self) -> bool:
        return bool(self.signals)


@contextlib.contextmanager
def deferred(deliver: bool = True) -> Iterator[Held]:
    """Hold SIGINT and SIGTERM while the block runs, and deliver the first of them when it ends
    (or drop it, with ``deliver=False``: for a stop's wind-down, when the stop is already under way).

    Only handlers written in Python are held (ours, or Python's own KeyboardInterrupt); a signal
    left to its default action keeps it. A second signal while one is held ends the process at once,
    as a second signal does anyway. In another thread than the main one the block runs as it is.
    """
    held = Held()
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    saved = {signum: signal.getsignal(signum) for signum in SIGNALS}

    def remember(signum: int, frame) -> None:
        if held.signals:
            _end_at_once(signum)
        held.signals.append(signum)

    caught = [signum for signum, handler in saved.items() if callable(handler)]
    for signum in caught:
        signal.signal(signum, remember)
    try:
        yield held
    finally:
        for signum in caught:
            signal.signal(signum, saved[signum])
        if held.signals and deliver:
            saved[held.signals[0]](held.signals[0], None)  # raises now (Interrupted, or KeyboardInterrupt)


def as_interrupt(exc: BaseException | None) -> Interrupted | None:
    """``exc`` as an :class:`Interrupted`, if it is one in disguise.

    KeyboardInterrupt, Ray's SystemExit(15) (a Ray worker's or a library caller's ``ray.init``
    installs it), and any error whose cause or context is one of these: a signal that lands inside
    a C extension comes out as ``SystemError: ... returned a result with an exception set``, with
    the interruption as its cause.
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


def guarded(fn: Callable[[], int], kept: str, prog: str = "fedrobust", *, then_ignore: bool = False) -> int:
    """Run a command with the handlers installed (and restored after): a :class:`ConfigError` exits 2,
    a :class:`OneLineFailure` 1, and an interruption ``128 + signum``, each with one line on stderr
    (for an interruption, saying what was kept).

    ``then_ignore``: the process ends with this code (a command line's own process): signals that
    come after the command has finished are ignored while the interpreter shuts down, so that the exit
    code says what the command did, not that a signal cut the shutdown short."""
    main = threading.current_thread() is threading.main_thread()
    saved = ({signum: signal.getsignal(signum) for signum in SIGNALS}, sys.unraisablehook) if main else None
    install()
    try:
        return fn()
    except (ConfigError, OneLineFailure) as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except BaseException as exc:
        intr = as_interrupt(exc)
        if intr is None:
            raise
        print(f"{prog}: interrupted ({intr.name}); {kept}", file=sys.stderr)
        return intr.exit_code
    finally:
        if saved is not None:
            for signum, handler in saved[0].items():
                signal.signal(signum, signal.SIG_IGN if then_ignore else handler)
            sys.unraisablehook = saved[1]


HOLD_ENV = "FEDROBUST_HOLD"  # comma-separated names of the points to pause at
HOLD_DIR_ENV = "FEDROBUST_HOLD_DIR"  # where a paused process says so, and is told to go on
HOLD_MAX_S = 120.0


def hold(point: str) -> None:
    """Test hook: pause here while ``FEDROBUST_HOLD`` names ``point``.

    The process writes its pid to ``$FEDROBUST_HOLD_DIR/<point>``, then waits (in Python, in short
    sleeps, so that a signal is taken at once) until ``<point>.go`` appears there, or for at most
    two minutes. Without the variable this is one dictionary lookup.
    """
    points = os.environ.get(HOLD_ENV)
    if not points or point not in points.split(","):
        return
    folder = Path(os.environ.get(HOLD_DIR_ENV, "."))
    (folder / f".{point}.{os.getpid()}").write_text(str(os.getpid()))
    os.replace(folder / f".{point}.{os.getpid()}", folder / point)  # whole when it appears
    deadline = time.monotonic() + HOLD_MAX_S
    while not (folder / f"{point}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
