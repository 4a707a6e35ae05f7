"""Closing the trial pool: a cancel reaches a trial as KeyboardInterrupt, and a trial that ignores it cannot hang
the close (the tuner's stop), on a real private Ray instance.

Each scenario runs in a child Python process with a hard time limit, so that a hang fails the test instead of
the suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCENARIO = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path

    from fedrobust.tuning.pool import TrialPool

    marks = Path(sys.argv[1])

    def task(name, ignore):
        yield {"event": "start", "host": "elsewhere"}
        (marks / f"{name}.running").touch()  # the stream runs ahead of its reader
        try:
            while True:
                try:
                    time.sleep(0.05)
                except KeyboardInterrupt:
                    (marks / f"{name}.interrupted").touch()
                    if not ignore:
                        raise
        finally:
            (marks / f"{name}.ended").touch()

    pool = TrialPool(task, address=None, cpus=1, gpus=0, max_concurrent=2)
    try:
        pool.start()
        pool.submit("polite", marks / "polite-run", "polite", False)
        pool.submit("stubborn", marks / "stubborn-run", "stubborn", True)
        # both run, and neither start event has been read (as when a stop comes right after a launch)
        deadline = time.monotonic() + 60
        while not all((marks / f"{n}.running").exists() for n in ("polite", "stubborn")) and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        cancelled = pool.close(grace_s=1.0)
        print(f"closed {sorted(cancelled)} in {time.monotonic() - t0:.2f} s", flush=True)
    finally:
        pool.close()
''')


def test_close_interrupts_each_trial_and_a_trial_that_ignores_it_cannot_hang_it(tmp_path):
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO)
    marks = tmp_path / "marks"
    marks.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="frpool-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        _run(script, marks, ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _run(script: Path, marks: Path, ray_tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")} | {"RAY_TMPDIR": str(ray_tmp)}
    proc = subprocess.Popen([sys.executable, str(script), str(marks)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the pool's close hung:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("closed "))
    assert line.startswith("closed ['polite', 'stubborn'] in "), line
    seconds = float(line.split(" in ")[1].split(" s")[0])
    assert seconds < 1.0 + 3.0 + 2.0, line  # the grace, the forced end's wait, and a margin
    # the cancel reached both as KeyboardInterrupt (an ignored SIGINT in Ray's workers would swallow it)
    assert (marks / "polite.interrupted").exists() and (marks / "polite.ended").exists()
    assert (marks / "stubborn.interrupted").exists()  # it was asked; it ignored it, and its worker was killed
    assert not list(ray_tmp.iterdir())  # the private instance's folder is gone
