"""SIGINT and SIGTERM to ``fedrobust train`` on the simulation engine, at four points of a run.

Each try is a real ``python -m fedrobust.cli train engine=simulation`` in a
session of its own, signalled (as ``kill -INT PID`` does: the process, not its
group) when a line of its train.log appears:

* ``starting``: 1.5 s after ``simulation engine: ...``, Ray is starting;
* ``before``: ``round 1/2: training``, the ServerApp has sent the first
  tasks and the client actors are starting or training;
* ``between``: ``round 1: reply 1/3``, one reply in, the others pending;
* ``collect``: ``round 1: reply 3/3``, the ServerApp is collecting the
  round's members, round 2 not sent yet.

Every try must exit 130 (SIGINT) or 143 (SIGTERM) within 10 s of the signal
with one ``fedrobust: interrupted`` line, no traceback, no error from Flower
or Ray, leave its run directory marked INCOMPLETE, and leave no process alive.
A process the try started is found three ways, so that none escapes: its
session (the child leads a new one, and Ray starts its services and workers
without a session of their own), a mark in its environment (inherited by
everything it starts, whatever the parent), and the try's private Ray temp
dir in its command line (Ray's services name it; its agents overwrite their
command line and environment, but keep the session).
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
POINTS = {"starting": "simulation engine: ", "before": "round 1/2: training", "between": "round 1: reply 1/3",
          "collect": "round 1: reply 3/3"}
# each point hit by each signal, once
TRIES = [(sig, point) for sig in (signal.SIGINT, signal.SIGTERM) for point in POINTS]
# three nodes, two rounds of 8 epochs: each node trains for a second or more per round, so that the
# replies of a round come apart and round 2 is still to come at every point
TRAIN = ["train", "engine=simulation", "train.epochs=16", "train.rounds=2", "train.patience=100",
         "train.progress=false"]
EXIT_WITHIN_S = 10.0


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


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before '{text}' appeared")
        time.sleep(0.05)
    raise AssertionError(f"'{text}' did not appear in {log} within {timeout}s")


def _replies_before_the_signal(train_log: str) -> list[str]:
    lines = train_log.splitlines()
    end = next(i for i, line in enumerate(lines) if "interrupted by SIG" in line)
    return [line for line in lines[:end] if ": reply " in line]


@pytest.mark.parametrize("sig, point", [pytest.param(s, p, id=f"{s.name}-{p}") for s, p in TRIES])
def test_a_signal_ends_the_simulation_at_once_in_one_line_and_leaves_nothing_running(sig, point, tmp_path):
    run, out_log = tmp_path / "run", tmp_path / "out.log"
    ray_tmp = tempfile.mkdtemp(prefix="frsig-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    key, value = "FEDROBUST_SIGNAL_TRY", uuid.uuid4().hex
    mark = f"{key}={value}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")} | {
        "FEDROBUST_CACHE": str(cache_dir(tmp_path / "cache")), "RAY_TMPDIR": ray_tmp, key: value}
    proc = None
    try:
        with open(out_log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "fedrobust.cli", *TRAIN, f"run_dir={run}"], cwd=tmp_path,
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for_line(run / "train.log", POINTS[point], proc)
        if point == "starting":
            time.sleep(1.5)  # into ray.init, which takes seconds
        sent = time.monotonic()
        proc.send_signal(sig)
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
        for bad in ("Traceback", "Aborted", "ERROR", "(raylet)", "*** SIG", "logging.cc"):
            assert bad not in output, output[-3000:]
        lines = [ln for ln in output.splitlines() if ln.startswith("fedrobust: ")]
        assert len(lines) == 1, output
        assert lines[0].startswith(f"fedrobust: interrupted ({sig.name}); training stopped; "), lines[0]
        assert (run / "INCOMPLETE").is_file() and not (run / "results.json").exists()
        assert not list(run.rglob(".*.tmp"))
        # the signal came where it was meant to
        replies = _replies_before_the_signal((run / "train.log").read_text())
        low, high = {"starting": (0, 0), "before": (0, 0), "between": (1, 2), "collect": (3, 3)}[point]
        assert low <= len(replies) <= high, replies
        assert all(line.split(": reply ")[0].endswith("round 1") for line in replies), replies
        assert "(an error)" not in "".join(replies), replies
        # nothing it started outlives it: Ray's services and workers end with it (give the kernel a moment)
        deadline = time.monotonic() + 5.0
        while (left := _started_by(proc.pid, mark.encode(), ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, left
    finally:
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
