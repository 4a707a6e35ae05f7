"""SIGINT and SIGTERM to ``fedrobust tune`` while its private Ray instance starts, reached deterministically.

The tuner starts Ray in a child process of its own session
(:mod:`fedrobust.rayhead`) and connects to it from a thread of its own
(:mod:`fedrobust.rayinit`). Two moments, each reached through a pause point
(``FEDROBUST_HOLD``), not a sleep:

* ``ray-head``: Ray's services are up in the child, the tuner still waits for
  it: the stop must not wait for anything; the child's group is killed;
* ``ray-connecting``: the tuner's driver is about to connect (the signal is
  held until the connection is made, then everything is closed).

Each try must exit 130 or 143 within a few seconds, in one line, and leave no
process and no Ray folder.
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

import pytest

from shared_cache import cache_dir
from test_signals_simulation import _started_by, _wait_for

pytestmark = pytest.mark.slow

EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
TINY = ["engine=inline", "train.epochs=2", "train.progress=false", "attack.num_samples=60", "attack.surrogates=[cnn]",
        "attack.surrogate_epochs=3", "attack.transfer_attacks=[cwa]", "attack.transfer=cwa", "attack.transfer_steps=3",
        "attack.query_attacks=[square_linf]", "attack.query=square_linf", "attack.queries=20", "attack.whitebox=[]",
        "attack.tsr=false", "attack.hessian_samples=0", "attack.per_member=false"]
EXIT_WITHIN_S = {"ray-head": 3.0, "ray-connecting": 6.0}


@pytest.mark.parametrize("sig, point", [pytest.param(s, p, id=f"{s.name}-{p}") for s in EXIT
                                        for p in ("ray-head", "ray-connecting")])
def test_a_signal_while_the_tuners_ray_starts_ends_it_at_once_and_leaves_nothing(sig, point, tmp_path):
    study, out_log, holds = tmp_path / "study", tmp_path / "out.log", tmp_path / "holds"
    holds.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="frsig-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    key, value = "FEDROBUST_SIGNAL_TRY", uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")} | {
        "FEDROBUST_CACHE": str(cache_dir(tmp_path / "cache")), "RAY_TMPDIR": ray_tmp, key: value,
        "FEDROBUST_HOLD_DIR": str(holds), "FEDROBUST_HOLD": point}
    cmd = [sys.executable, "-m", "fedrobust.cli", "tune", f"study_dir={study}", "tune.n_trials=2",
           "tune.population_size=2", "tune.max_concurrent=1", "tune.baseline_accuracy=0.5", *TINY]
    proc = None
    try:
        with open(out_log, "w") as out:
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        _wait_for(holds / point, proc, out_log)
        sent = time.monotonic()
        proc.send_signal(sig)
        if point == "ray-connecting":  # the connection goes on; the signal is taken once it is made
            (holds / f"{point}.go").touch()
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - sent
        output = out_log.read_text(errors="replace")
        print(f"{sig.name} at {point}: exit {code} {took:.2f}s after the signal")  # shown with pytest -s
        assert code == EXIT[sig], f"exit {code} after {took:.1f}s:\n{output[-3000:]}"
        assert took < EXIT_WITHIN_S[point], f"exited {took:.1f}s after the signal:\n{output[-3000:]}"
        for bad in ("Traceback", "Aborted", "ERROR", "(raylet)", "*** SIG", "logging.cc", "core_worker"):
            assert bad not in output, output[-3000:]
        lines = [ln for ln in output.splitlines() if ln.startswith("fedrobust: ")]
        assert len(lines) == 1 and lines[0].startswith(f"fedrobust: interrupted ({sig.name}); "), output[-3000:]
        deadline = time.monotonic() + 5.0
        while (left := _started_by(proc.pid, f"{key}={value}".encode(), ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, left
        assert os.listdir(ray_tmp) == [], os.listdir(ray_tmp)  # no Ray folder left behind
    finally:
        (holds / f"{point}.go").touch()  # never leave a paused process waiting
        if proc is not None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for pid in _started_by(proc.pid, f"{key}={value}".encode(), ray_tmp):  # by id: what a failed try left
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
