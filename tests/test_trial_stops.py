"""Stopping a study or a sweep leaves nothing behind: no trial child, no Ray, no scratch folder.

The tuner runs as a real process with a marker in its environment. Every
process it starts inherits that environment (Ray's GCS server, raylets and
workers, a trial's simulation child and that child's own Ray), so "nothing
it started is alive" is checked by scanning ``/proc/*/environ`` for the
marker. The processes are this user's, so their environments are readable.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedrobust.tuning.outputs import read_trials_csv
from shared_cache import cache_dir

MARK = "FEDROBUST_TEST_MARK"
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}

# A plug-in strategy (installed as a distribution on PYTHONPATH) that trains like plain cross-entropy, and
# raises while its flag file exists: a trial that raises, on demand, inside the ClientApp of a simulation.
BOOM = '''
import os
from dataclasses import dataclass

import torch.nn.functional as F

from strategies.base import LossTerms, TrainingStrategy


@dataclass
class BoomConfig:
    flag: str = ""


class Boom(TrainingStrategy):
    name = "boom"
    Config = BoomConfig

    def __init__(self, flag=""):
        self.flag = flag

    def loss(self, model, x, y, *, peers=()):
        if self.flag and os.path.exists(self.flag):
            raise RuntimeError("boom: the flag file exists")
        logits = model(x)
        ce = F.cross_entropy(logits, y)
        return LossTerms(total=ce, terms={"ce": ce.detach()}, logits=logits.detach())
'''

# one trial of one node on the simulation engine, trained long enough (12 epochs) to be stopped while it trains
STUDY = ["engine=simulation", "deployment=centralized", "strategy=boom", "tune.n_trials=1", "tune.population_size=2", "tune.max_concurrent=1",
         "tune.max_failures=0", "tune.baseline_accuracy=0.5", "train.epochs=12", "train.progress=false",
         "attack.num_samples=60",
         "attack.surrogates=[cnn]", "attack.surrogate_epochs=3", "attack.transfer_attacks=[cwa]",
         "attack.transfer_steps=3", "attack.query_attacks=[square_linf]", "attack.queries=20", "attack.whitebox=[]",
         "attack.tsr=false", "attack.hessian_samples=0", "attack.per_member=false"]


def marked(mark: str) -> list[str]:
    """The live processes (pid and command) whose environment holds ``MARK=mark``."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie has ended; only its exit status waits for its parent
                    command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    found.append(f"{entry.name} {command[:120]}")
        except OSError:  # ended meanwhile, or not ours
            continue
    return found


def kill_marked(mark: str) -> None:
    for line in marked(mark):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except OSError:
            pass


def install_boom(tmp: Path) -> Path:
    site = tmp / "site"
    info = site / "fedrobust_boom-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "fedrobust_boom.py").write_text(BOOM)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedrobust-boom\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedrobust.strategies]\nboom = fedrobust_boom:Boom\n")
    return site


def env_for(tmp: Path, mark: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(install_boom(tmp)), os.environ.get("PYTHONPATH", "")) if p)
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")} | {
        MARK: mark, "FEDROBUST_SCRATCH": str(tmp / "scratch"), "FEDROBUST_CACHE": str(cache_dir(tmp / "cache")),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PYTHONPATH": path}


def wait_until(check, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the tuner ended before {what}: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout}s: {log.read_text(errors='replace')[-2000:]}")


def training_child(scratch: Path) -> bool:
    """A trial's simulation child is alive and its nodes are training (the round has started)."""
    for log in scratch.glob("trial_*/trial_*/train.log"):
        if "round 1/" in log.read_text(errors="replace") and list(scratch.glob("trial_*/child.pid")):
            return True
    return False


def stop_once(cmd: list[str], env: dict[str, str], tmp: Path, mark: str, how) -> None:
    """Start the tuner and stop it: by ``how`` (a signal) while its trial's simulation child trains, or
    by a trial that raises (``how == "raise"``: the flag file exists, and tune.max_failures=0). The tuner
    must exit at once in one line, and nothing it started may be alive 10 s later, nor any scratch folder."""
    study, scratch, flag = tmp / "study", tmp / "scratch", tmp / "raise"
    log = tmp / f"tune-{how if how == 'raise' else how.name}.log"
    if how == "raise":
        flag.write_text("the boom strategy raises while this file exists\n")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: training_child(scratch), proc, log, 240, "a trial's child started training")
        assert marked(mark), "no process carries the marker: the scan would prove nothing"
        if how == "raise":
            try:
                code = proc.wait(timeout=240)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the tuner did not stop after its trial raised: {log.read_text()[-2000:]}")
            took = 0.0
            text = log.read_text(errors="replace")
            assert code == 1, text[-2000:]
            last = text.strip().splitlines()[-1]
            assert last.startswith("fedrobust: error: 1 trial(s) failed or were lost (tune.max_failures=0); "
                                   "the last, trial ") and "RuntimeError: boom: the flag file exists" in last, last
        else:  # the moment is reached: the child's nodes train (12 epochs to come)
            sent = time.monotonic()
            proc.send_signal(how)  # the tuner alone, as `kill -INT PID` does
            try:
                code = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the tuner was still running 15 s after {how.name}: {log.read_text()[-2000:]}")
            took = time.monotonic() - sent
            text = log.read_text(errors="replace")
            assert code == EXIT[how], text[-2000:]
            assert f"fedrobust: interrupted ({how.name})" in text.strip().splitlines()[-1], text[-1000:]
            events = (study / "executions.jsonl").read_text().strip().splitlines()
            assert '"cancelled"' in events[-1], events[-3:]
        assert "Traceback" not in text, text[-3000:]
        deadline = time.monotonic() + 10
        while (left := marked(mark)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert left == [], f"left running 10 s after the tuner exited ({took:.1f} s after the signal): {left}"
        assert list(scratch.iterdir()) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_marked(mark)
        flag.unlink(missing_ok=True)


@pytest.mark.slow
def test_a_stopped_study_leaves_nothing_running_and_resumes(tmp_path):
    """One study stopped twice, by SIGINT while its trial's simulation child trains and by a trial that
    raises; each time the tuner exits at once (130, 1), nothing it started is alive 10 s later, and no
    scratch folder is left. The same command then completes it. (SIGTERM to the tuner takes the same
    handler: tests/test_interrupt.py sends it to a study whose trials run in process.)"""
    mark = uuid.uuid4().hex
    study, scratch = tmp_path / "study", tmp_path / "scratch"
    cmd = [sys.executable, "-m", "fedrobust.cli", "tune", f"study_dir={study}", *STUDY,
           f"strategy.flag={tmp_path / 'raise'}"]
    env = env_for(tmp_path, mark)
    for how in (signal.SIGINT, "raise"):
        stop_once(cmd, env, tmp_path, mark, how)

    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    try:
        assert done.returncode == 0, done.stderr[-2000:]
        rows = read_trials_csv(study / "trials.csv")
        assert [r["state"] for r in rows] == ["FAIL", "FAIL", "COMPLETE"]
        assert [r["failure"] for r in rows[:2]] == ["cancelled", "error"]  # cancelled (re-queued), then raised
        assert marked(mark) == [] and list(scratch.iterdir()) == []
    finally:
        kill_marked(mark)


@pytest.mark.slow
def test_a_sweep_whose_cell_always_crashes_its_worker_ends_after_max_failures(tmp_path, monkeypatch):
    import json

    from fedrobust.tuning.runner import TooManyFailures
    from fedrobust.tuning.sweep import SWEEP_DEFAULTS, Cell, run_sweep

    monkeypatch.setenv("FEDROBUST_CACHE", str(cache_dir(tmp_path / "cache")))
    monkeypatch.setenv("FEDROBUST_SCRATCH", str(tmp_path / "scratch"))

    def crash(cfg_yaml, values, name, threads=1, artefacts=None):  # pickled by value: a closure of this test
        yield {"event": "start", "host": "worker"}
        os._exit(1)  # the worker dies under the task: Ray reports it lost, not failed

    tiny = [*SWEEP_DEFAULTS, "train.epochs=1", "attack.surrogates=[cnn]", "attack.surrogate_epochs=3",
            "attack.transfer_attacks=[cwa]", "attack.transfer_steps=3", "attack.query_attacks=[square_linf]",
            "attack.queries=20", "attack.per_member=false", "train.progress=false"]
    cells = [Cell("lr-0.1", [*tiny, "optimizer.lr=0.1"], "lr", 0.1)]
    with pytest.raises(TooManyFailures) as err:
        run_sweep("crash", cells, tmp_path / "sweep", max_concurrent=1, max_failures=2, progress=False, task=crash)
    message = str(err.value)
    assert "\n" not in message and "cell lr-0.1" in message and "(max_failures=2)" in message, message
    assert message.startswith("3 trial(s) failed or were lost"), message
    events = [json.loads(line) for line in (tmp_path / "sweep" / "executions.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] != "start"] == ["lost", "lost", "lost"]
    assert read_trials_csv(tmp_path / "sweep" / "cells.csv")[0]["status"] == "missing"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # members that are zombies have ended; only their exit status waits for a parent
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


@pytest.mark.slow
def test_an_interrupted_wait_stops_the_simulation_childs_whole_process_group(tmp_path, monkeypatch):
    """What a non-forced Ray cancel does to a trial whose simulation child runs: the wait ends in a
    KeyboardInterrupt, and the child's whole group, its pid file and its Ray folder are gone at once."""
    import _thread
    import threading

    from fedrobust.config import load_config
    from fedrobust.engines import run_simulation
    from fedrobust.run import prepare_run_dir
    from fedrobust.tuning.child import PID_FILE

    holds = tmp_path / "holds"
    holds.mkdir()
    monkeypatch.setenv("FEDROBUST_HOLD", "ray-starting")  # the child pauses before it starts Ray
    monkeypatch.setenv("FEDROBUST_HOLD_DIR", str(holds))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray"))
    cfg = load_config(["engine=simulation", "train.progress=false", f"run_dir={tmp_path / 'run'}"])
    run_dir = prepare_run_dir(cfg, cfg.run_dir)
    pid_file = tmp_path / PID_FILE
    # A pytest-xdist worker ignores SIGINT, which would make interrupt_main a no-op: Python's own handler
    # is installed for the test.
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    seen: dict[str, str] = {}

    def cancel_once_paused():
        deadline = time.monotonic() + 120
        while not (holds / "ray-starting").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        seen["pid_file"] = pid_file.read_text() if pid_file.exists() else ""
        _thread.interrupt_main()

    timer = threading.Thread(target=cancel_once_paused, daemon=True)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_simulation(cfg, run_dir, num_cpus=1, pid_file=pid_file)
    finally:
        (holds / "ray-starting.go").touch()
        timer.join(timeout=130)
        signal.signal(signal.SIGINT, saved)
    pid, temp_dir = seen["pid_file"].split()
    assert not _group_alive(int(pid))
    assert not pid_file.exists() and not Path(temp_dir).exists()
    assert (run_dir / "INCOMPLETE").is_file() and not list(run_dir.rglob(".*.tmp"))


def test_cleanup_stops_the_recorded_child_and_removes_only_a_scratch_folder(tmp_path, monkeypatch):
    from fedrobust.tuning.child import PID_FILE, cleanup_work_dir

    monkeypatch.setenv("FEDROBUST_SCRATCH", str(tmp_path / "scratch"))
    work = tmp_path / "scratch" / "trial_0001-abcd"
    work.mkdir(parents=True)
    child = subprocess.Popen(["sh", "-c", "sleep 62 & sleep 62"], start_new_session=True)
    (work / PID_FILE).write_text(str(child.pid))
    cleanup_work_dir(work)
    child.wait(timeout=10)
    assert not _group_alive(child.pid) and not work.exists()

    elsewhere = tmp_path / "kept"  # not directly under the scratch root: never removed
    elsewhere.mkdir()
    cleanup_work_dir(elsewhere)
    assert elsewhere.is_dir()


def test_a_sweep_script_reports_too_many_failures_in_one_line(capsys):
    from fedrobust.interrupt import guarded
    from fedrobust.tuning.runner import TooManyFailures

    def main() -> int:
        raise TooManyFailures("4 trial(s) failed or were lost (max_failures=3); the last, cell lr-0.1, failed: boom")

    assert guarded(main, "kept", prog="rq12") == 1
    err = capsys.readouterr().err
    assert err == "rq12: error: 4 trial(s) failed or were lost (max_failures=3); the last, cell lr-0.1, failed: boom\n"
