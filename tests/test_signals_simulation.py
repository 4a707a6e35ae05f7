"""SIGINT and SIGTERM to ``fedrobust train`` on the simulation engine, at each moment of a run, reached
deterministically.

Each try is a real ``python -m fedrobust.cli train engine=simulation``
started as a script's background job starts it (``cmd &``: SIGINT ignored at
exec), in a session of its own, and signalled (as ``kill -INT PID`` does: the
process, not its group) while it is paused at a named point. No try sleeps to
reach its moment:

* ``startup``: during imports, before any config is composed: a test plug-in
  pauses in its own import, which the command line loads before it reads the
  config (the window in which a signal used to be lost, or answered by a
  traceback);
* ``ray-starting``: the simulation's child is about to start Ray
  (``FEDROBUST_HOLD``, :func:`fedrobust.interrupt.hold`);
* ``between``: one reply of round 1 in, the others pending;
* ``collect``: all three replies of round 1 in, round 2 not sent;
* ``wind-down``: a second signal (the other one) while the first one's stop is
  being wound down: it changes nothing.

Every try must exit 130 (SIGINT) or 143 (SIGTERM), after the first signal,
within 10 s, with one ``fedrobust: interrupted`` line, no traceback, no error
from Flower or Ray, leave its run directory marked INCOMPLETE (or not created,
at start-up) with no half-written file, and leave nothing: no process, no Ray
folder. A process the try started is found three ways, so that none escapes:
its session (the command leads a new one, and Ray starts its services and
workers without a session of their own), a mark in its environment (inherited
by everything it starts), and the try's private Ray temp dir in its command
line (Ray's services name it; its agents overwrite their command line and
environment, but keep the session).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from shared_cache import cache_dir

pytestmark = pytest.mark.slow

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
OTHER = {signal.SIGINT: signal.SIGTERM, signal.SIGTERM: signal.SIGINT}
# the point each moment pauses at, and how many replies of round 1 the log holds then
POINTS = {"startup": ("import", None), "ray-starting": ("ray-starting", 0), "between": ("reply-1-1", 1),
          "collect": ("reply-1-3", 3), "wind-down": ("reply-1-1", 1)}
TRIES = [(sig, point) for sig in (signal.SIGINT, signal.SIGTERM) for point in POINTS]
# three nodes, two rounds: round 2 is still to come at every point
TRAIN = ["train", "engine=simulation", "train.epochs=4", "train.rounds=2", "train.patience=100", "train.progress=false"]
EXIT_WITHIN_S = 10.0

# A plug-in whose import pauses while its hold folder is set: the command line loads plug-ins before it
# composes the config, so this is a moment "during imports and config composition", in any version.
# (a plain loss, so that a version which lost the signal goes on to train)
PAUSING_PLUGIN = '''
import os, time

import torch.nn.functional as F

folder = os.environ.get("FEDROBUST_TEST_IMPORT_HOLD")
if folder:
    open(os.path.join(folder, "import"), "w").close()
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(folder, "import.go")) and time.monotonic() < deadline:
        time.sleep(0.02)


def pause(logits, y):
    return F.cross_entropy(logits, y, reduction="none")
'''


def _install_pausing_plugin(site: Path) -> None:
    info = site / "fedrobust_pause-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "fedrobust_pause.py").write_text(PAUSING_PLUGIN)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedrobust-pause\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedrobust.losses]\npause = fedrobust_pause:pause\n")


def _stat(pid: int) -> list[str] | None:
    try:  # the fields after the command's closing parenthesis: state, ppid, pgrp, session, ...
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _started_by(leader: int, mark: bytes, ray_tmp: str) -> dict[int, str]:
    """Live (not zombie) processes of the try: in its session, with its mark, or naming its Ray temp dir."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        stat = _stat(pid)
        if stat is None or stat[0] == "Z":
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        try:
            marked = mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # another user's process
            marked = False
        if int(stat[3]) == leader or marked or ray_tmp in cmd:
            found[pid] = cmd[:160]
    return found


def _wait_for(path: Path, proc: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before pausing at {path.name}:\n"
                                 f"{out.read_text(errors='replace')[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"the run did not pause at {path.name} within {timeout}s")


def _replies_before_the_signal(train_log: str) -> list[str]:
    lines = train_log.splitlines()
    end = next((i for i, line in enumerate(lines) if "interrupted by SIG" in line), len(lines))
    return [line for line in lines[:end] if ": reply " in line]


@pytest.mark.parametrize("sig, point", [pytest.param(s, p, id=f"{s.name}-{p}") for s, p in TRIES])
def test_a_signal_at_any_moment_ends_the_simulation_at_once_in_one_line_and_leaves_nothing(sig, point, tmp_path):
    run, out_log, holds, site = tmp_path / "run", tmp_path / "out.log", tmp_path / "holds", tmp_path / "site"
    holds.mkdir()
    if point == "startup":
        _install_pausing_plugin(site)
    ray_tmp = tempfile.mkdtemp(prefix="frsig-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    key, value = "FEDROBUST_SIGNAL_TRY", uuid.uuid4().hex
    mark = f"{key}={value}"
    pause, replies_then = POINTS[point]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")} | {
        "FEDROBUST_CACHE": str(cache_dir(tmp_path / "cache")), "RAY_TMPDIR": ray_tmp, key: value,
        "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p),
        "FEDROBUST_HOLD_DIR": str(holds)}
    if point == "startup":
        env["FEDROBUST_TEST_IMPORT_HOLD"] = str(holds)
    else:
        env["FEDROBUST_HOLD"] = f"{pause},wind-down" if point == "wind-down" else pause
    cmd = " ".join([sys.executable, "-m", "fedrobust.cli", *TRAIN, f"run_dir={run}"])
    proc = None
    try:
        with open(out_log, "w") as out:  # `trap '' INT; exec`: SIGINT ignored at exec, as for `cmd &` in a script
            proc = subprocess.Popen(["sh", "-c", f"trap '' INT; exec {cmd}"], cwd=tmp_path, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for(holds / pause, proc, out_log)
        sent = time.monotonic()
        proc.send_signal(sig)
        if point == "startup":  # let it go on: a lost signal shows as a run that trains to its end
            (holds / "import.go").touch()
        if point == "wind-down":  # the first signal's stop is under way, paused: a second one comes
            _wait_for(holds / "wind-down", proc, out_log, timeout=EXIT_WITHIN_S)
            proc.send_signal(OTHER[sig])
            (holds / "wind-down.go").touch()
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - sent
        output = out_log.read_text(errors="replace")
        print(f"{sig.name} at {point}: exit {code} {took:.2f}s after the signal")  # shown with pytest -s
        assert code == EXIT[sig], f"exit {code} after {took:.1f}s:\n{output[-3000:]}"
        assert took < EXIT_WITHIN_S, f"exited {took:.1f}s after the signal:\n{output[-3000:]}"
        # Ray's C++ failure handler prints "*** SIGTERM received" with a stack when it holds SIGTERM
        for bad in ("Traceback", "Aborted", "ERROR", "(raylet)", "*** SIG", "logging.cc", "core_worker"):
            assert bad not in output, output[-3000:]
        lines = [ln for ln in output.splitlines() if ln.startswith("fedrobust: ")]
        assert len(lines) == 1, output
        if point == "startup":
            assert lines[0] == f"fedrobust: interrupted ({sig.name}); nothing was written", lines[0]
            assert not run.exists()
        else:
            assert lines[0].startswith(f"fedrobust: interrupted ({sig.name}); training stopped; "), lines[0]
            assert (run / "INCOMPLETE").is_file() and not (run / "results.json").exists()
            assert not list(run.rglob(".*.tmp"))
            # the signal came where it was meant to
            replies = _replies_before_the_signal((run / "train.log").read_text())
            assert len(replies) == replies_then, replies
            assert all(line.split(": reply ")[0].endswith("round 1") for line in replies), replies
            assert "(an error)" not in "".join(replies), replies
        # nothing it started outlives it: Ray's services and workers end with it (give the kernel a moment)
        deadline = time.monotonic() + 5.0
        while (left := _started_by(proc.pid, mark.encode(), ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, left
        assert os.listdir(ray_tmp) == [], os.listdir(ray_tmp)  # no Ray session folder left behind
    finally:
        for name in ("import", "ray-starting", "reply-1-1", "reply-1-3", "wind-down"):
            (holds / f"{name}.go").touch()  # never leave a paused process waiting
        if proc is not None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for pid in _started_by(proc.pid, mark.encode(), ray_tmp):  # by id: what a failed try left
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
