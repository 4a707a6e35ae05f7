"""Stress test: SIGINT or SIGTERM at uniformly random moments of a ``fedrobust`` command's life.

The suite's signal tests (tests/test_signals_simulation.py, tests/test_interrupt.py,
tests/test_trial_stops.py) signal a command at a few chosen points, found by waiting
for a line of its log. This tool signals it at random: each try starts a real
``python -m fedrobust.cli ...`` in a session of its own, sleeps a delay drawn
uniformly in [0, 1.05 T] (T: the command's wall time without a signal, measured once
per output folder), sends the signal to the process only (as ``kill -INT PID``
does), and checks that the command stopped cleanly:

* exit code 128 + signum if it was still running (0 if it had finished, or finished
  before the signal took effect, with its outputs complete; -signum, the signal's
  default action, only if it printed nothing and wrote nothing: the signal came
  before Python ran any fedrobust code), within 10 s of the signal (a try still
  running 60 s after it is killed and counted "hung");
* no ``Traceback``, ``Aborted``, ``*** SIG``, ``core_worker``, ``(raylet)`` or
  ``logging.cc`` in its output; when interrupted, exactly one line
  ``fedrobust: interrupted (SIGxxx); <what was kept>`` naming the signal sent, and no
  ``fedrobust: error:`` line;
* its outputs are what that line says (a run marked INCOMPLETE, or finished; an
  evaluated run's results.json unchanged, or changed with robust accuracies; a
  study whose trials.csv parses and whose study.db holds no RUNNING trial), and no
  half-written ``.*.tmp`` file is left under the try's folder or the shared cache;
* nothing is left 10 s after the exit: no live process in the try's session, with
  the try's mark (``FEDROBUST_STRESS_TRY``) in its environment, or with the try's
  private Ray temp dir in its command line (these are killed by id); the Ray temp
  dir and the scratch folder (``FEDROBUST_SCRATCH``) are empty or gone.

Commands (small configurations; the evaluated run is trained once per session of
the tool, and every try evaluates a copy of it):

* ``train``: ``fedrobust train train.epochs=2`` (Flower simulation on a private Ray);
* ``train-inline``: ``fedrobust train engine=inline train.epochs=20``;
* ``evaluate``: ``fedrobust evaluate RUN`` with a small set of attacks;
* ``tune``: a 2-trial study whose trials train on the simulation engine.

It is not part of the pytest suite: it runs for an hour or more, and a failure it finds is a
moment of a few milliseconds that a test could not hit on purpose. Each try
appends one JSON line to ``OUT/tries.jsonl`` (a rerun with the same ``--out`` skips
the tries already recorded, so a stopped run resumes); the folders of failed tries
are kept under ``OUT/failed/`` with their logs (files over 1 MiB left out).

Time, measured on a 2-core machine without a GPU: a try lasts on average half of
T plus the exit and the checks (the 10 s watch for leftover processes only when
some are alive). T and the seconds per try were, for ``train`` 15 s and 9 s,
``train-inline`` 8 s and 5 s, ``evaluate`` 12 s and 7.5 s, ``tune`` 50-65 s and
32 s. Calibration runs each command twice (the first run fills the cache), about
4 minutes in all. The defaults (100 tries per signal of ``train``, 40 of the
others) take about 1.5 hours; ``--tries 3`` about 10 minutes. T is measured once:
another job on the machine during the calibration or the tries shifts the delays
against the command's phases (torch is several times slower on shared cores), so
run it on an otherwise idle machine where possible.

Usage::

    python benchmarks/signal_stress.py --out /tmp/stress [--root CHECKOUT]
        [--commands train,train-inline,evaluate,tune] [--signals INT,TERM]
        [--tries N | --tries-per-command train=100,tune=40] [--seed 0] [--report]

Reading the table: one row per command and signal: tries, passed, failed, the
outcomes (``130``/``143``: interrupted; ``0``: finished before the signal took
effect; ``default``: killed by the signal's default action, which passes only
with no output and nothing written; ``hung``; anything else is an exit code), and
the failures counted by reason (a try may fail for several): ``hung``, ``exit
code``, ``default action``, ``slow exit``, ``bad output``, ``message`` (the
``fedrobust:`` lines), ``outputs`` (the files do not match what the exit says),
``tmp files``, ``processes left``, ``ray temp left`` (Ray keeps its session
folder, logs included, unless the command removes it), ``scratch left``. Below the table, each reason's failed tries are
listed by moment: the delay in seconds and as a fraction of T, so that failures
that cluster at one phase of the command (start-up, Ray's start, shutdown) show.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the commands run on this repository's virtual environment (the code comes from --root, through PYTHONPATH)
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
MARK = "FEDROBUST_STRESS_TRY"
COMMANDS = ("train", "train-inline", "evaluate", "tune")
DEFAULT_TRIES = {"train": 100, "train-inline": 40, "evaluate": 40, "tune": 40}
BAD_OUTPUT = ("Traceback", "Aborted", "*** SIG", "core_worker", "(raylet)", "logging.cc")
DELAY_SPAN = 1.05  # delays are drawn in [0, DELAY_SPAN * T]
WAIT_S = 60.0  # a try still running this long after the signal is hung
EXIT_WITHIN_S = 10.0
LEFT_WITHIN_S = 10.0
KEEP_FILE_BYTES = 1 << 20  # larger files of a failed try are not kept
CALIBRATION_TIMEOUT_S = 1800.0

# evaluate: tests/test_interrupt.py's EVAL with a short white-box stage (a life of 10-20 s)
EVAL = ["attack.num_samples=100", "attack.surrogates=[cnn]", "attack.surrogate_epochs=2", "attack.transfer_attacks=[cwa]",
        "attack.transfer=cwa", "attack.transfer_steps=2", "attack.query_attacks=[square_linf]", "attack.query=square_linf",
        "attack.queries=20", "attack.per_member=false", "attack.whitebox=[apgd]", "attack.apgd_steps=250",
        "attack.tsr=false", "attack.hessian_samples=0", "train.progress=false"]
# tune: tests/test_interrupt.py's tiny study, its trials on the simulation engine
TINY = ["train.epochs=1", "train.progress=false", "attack.num_samples=60", "attack.surrogates=[cnn]",
        "attack.surrogate_epochs=3", "attack.transfer_attacks=[cwa]", "attack.transfer=cwa", "attack.transfer_steps=3",
        "attack.query_attacks=[square_linf]", "attack.query=square_linf", "attack.queries=20", "attack.whitebox=[]",
        "attack.tsr=false", "attack.hessian_samples=0", "attack.per_member=false"]
BASE_RUN = ["train", "engine=inline", "train.epochs=3", "train.progress=false"]


def fedrobust_args(command: str, work: Path) -> list[str]:
    """The ``fedrobust`` arguments of ``command`` for a try in the folder ``work``."""
    run, study = work / "run", work / "study"
    return {
        "train": ["train", "train.epochs=2", "train.progress=false", f"run_dir={run}"],
        "train-inline": ["train", "engine=inline", "train.epochs=20", "train.progress=false", f"run_dir={run}"],
        "evaluate": ["evaluate", str(run), *EVAL],
        "tune": ["tune", f"study_dir={study}", "engine=simulation", "tune.n_trials=2", "tune.population_size=2",
                 "tune.max_concurrent=1", "tune.baseline_accuracy=0.5", *TINY],
    }[command]


@dataclass
class Session:
    """What every try of one run of the tool shares."""

    out: Path
    root: Path
    commit: str
    cache: Path
    seed: int
    base_run: Path | None = None  # the run that evaluate's tries copy, trained when first needed


@dataclass
class Launched:
    """A started command: its process, folders and mark."""

    proc: subprocess.Popen
    work: Path
    ray_tmp: str
    mark: bytes
    log: Path
    started: float  # time.monotonic() just before the exec


@dataclass
class Outcome:
    """A finished try's facts, and the reasons it failed (empty: passed)."""

    reasons: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    def fail(self, reason: str, detail: str = "") -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
        if detail:
            self.details.append(f"{reason}: {detail}")


# --- processes -------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command's closing parenthesis (state, ppid, pgrp, session, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def try_processes(session: int, mark: bytes, ray_tmp: str) -> dict[int, str]:
    """Live (not zombie) processes of a try: pid -> command line.

    A process belongs to the try if it is in the try's session (the command leads a new
    one; Ray's services and workers stay in it), carries the try's mark in its environment
    (inherited by everything it starts, a trial's child in a session of its own included),
    or names the try's Ray temp dir in its command line (Ray's agents rewrite theirs).
    """
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
        except OSError:  # gone, or another user's
            marked = False
        if int(stat[3]) == session or marked or ray_tmp in cmd:
            found[pid] = cmd[:200]
    return found


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each process by id (those already gone are skipped)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def wait_for_none_left(run: Launched, within_s: float) -> dict[int, str]:
    """The try's processes still alive after waiting up to ``within_s`` for them to end."""
    deadline = time.monotonic() + within_s
    while (left := try_processes(run.proc.pid, run.mark, run.ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


# --- launching -------------------------------------------------------------------------------


def git_commit(root: Path) -> str:
    """``root``'s commit (12 digits), with ``-dirty`` if tracked files differ from it; ``unknown`` outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def launch(args: list[str], work: Path, session: Session) -> Launched:
    """Start ``python -m fedrobust.cli ARGS`` in ``work``, in a new session, with a fresh Ray temp dir and mark."""
    ray_tmp = tempfile.mkdtemp(prefix="frs-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    mark = uuid.uuid4().hex
    pythonpath = os.pathsep.join(p for p in (str(session.root), os.environ.get("PYTHONPATH", "")) if p)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS") and k != MARK} | {
        "FEDROBUST_CACHE": str(session.cache), "FEDROBUST_SCRATCH": str(work / "scratch"), "RAY_TMPDIR": ray_tmp,
        MARK: mark, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        "PYTHONPATH": pythonpath}
    log = work / "out.log"
    with open(log, "wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen([PYTHON, "-m", "fedrobust.cli", *args], cwd=work, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return Launched(proc, work, ray_tmp, f"{MARK}={mark}".encode(), log, started)


def stop_all(run: Launched) -> None:
    """Kill whatever is left of a try (its process group and every process of the try, by id) and reap it."""
    if run.proc.poll() is None:
        try:
            os.killpg(run.proc.pid, signal.SIGKILL)
        except OSError:
            pass
    kill_pids(list(try_processes(run.proc.pid, run.mark, run.ray_tmp)))
    try:
        run.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run_to_end(args: list[str], work: Path, session: Session, what: str) -> float:
    """Run a command without a signal; its wall time. Exits the tool with one line unless it exits 0."""
    work.mkdir(parents=True, exist_ok=True)
    run = launch(args, work, session)
    try:
        code = run.proc.wait(timeout=CALIBRATION_TIMEOUT_S)
        seconds = time.monotonic() - run.started
    except subprocess.TimeoutExpired:
        code, seconds = None, CALIBRATION_TIMEOUT_S
    finally:
        stop_all(run)
        shutil.rmtree(run.ray_tmp, ignore_errors=True)
    if code != 0:
        lines = run.log.read_text(errors="replace").strip().splitlines() or ["(no output)"]
        raise SystemExit(f"signal_stress: error: {what} exited {code} (log {run.log}): {lines[-1]}")
    return seconds


def base_run(session: Session) -> Path:
    """The trained run that evaluate's tries copy: trained once per session of the tool."""
    if session.base_run is None:
        work = session.out / "work" / "evaluate-base"
        shutil.rmtree(work, ignore_errors=True)
        run_to_end([*BASE_RUN, f"run_dir={work / 'run'}"], work, session, "training the run to evaluate")
        session.base_run = work / "run"
    return session.base_run


def prepare(command: str, work: Path, session: Session) -> None:
    """A fresh try folder, holding a copy of the trained run for evaluate."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if command == "evaluate":
        shutil.copytree(base_run(session), work / "run", symlinks=True)


def calibrate(command: str, session: Session) -> float:
    """The command's wall time without a signal, cached in OUT/calibration.json (a warm-up run first fills the cache)."""
    path = session.out / "calibration.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    key = f"{session.root}::{command}"
    if key in known:
        return known[key]["seconds"]
    times = []
    for n in (1, 2):
        work = session.out / "work" / f"calibrate-{command}"
        prepare(command, work, session)
        times.append(run_to_end(fedrobust_args(command, work), work, session, f"calibration of {command} (run {n})"))
        shutil.rmtree(work, ignore_errors=True)
    print(f"calibrated {command}: {times[1]:.1f} s (warm-up run {times[0]:.1f} s)", flush=True)
    known[key] = {"seconds": times[1], "warmup_seconds": times[0], "commit": session.commit, "at": time.ctime()}
    path.write_text(json.dumps(known, indent=1) + "\n")
    return times[1]


# --- checks ----------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under ``folder`` (but the try's log): is it a folder, its size and mtime."""
    found = {}
    for path in folder.rglob("*"):
        if path.name == "out.log" and path.parent == folder:
            continue
        try:
            st = path.lstat()
        except OSError:
            continue
        found[str(path.relative_to(folder))] = (path.is_dir(), st.st_size, st.st_mtime_ns)
    return found


def folder_bytes(folder: Path) -> int:
    """Total size of the regular files under ``folder``."""
    total = 0
    for base, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


def check_output(output: str, result: Outcome) -> None:
    """No traceback, abort, or message of Ray's C++ core in the command's output."""
    for bad in BAD_OUTPUT:
        if bad in output:
            result.fail("bad output", repr(bad))


def check_messages(output: str, sig: signal.Signals, interrupted: bool, result: Outcome) -> str:
    """The output's ``fedrobust:`` lines; returns what the interrupted line says was kept ("" if none)."""
    lines = [ln for ln in output.splitlines() if ln.startswith("fedrobust: ")]
    errors = [ln for ln in lines if ln.startswith("fedrobust: error:")]
    stops = [ln for ln in lines if ln.startswith("fedrobust: interrupted (")]
    if errors:
        result.fail("message", errors[0][:200])
    if not interrupted:
        if stops:
            result.fail("message", f"exit 0 with {stops[0][:200]}")
        return ""
    expected = f"fedrobust: interrupted ({sig.name}); "
    if len(stops) != 1 or not stops[0].startswith(expected):
        result.fail("message", f"{len(stops)} interrupted line(s), expected one starting {expected!r}: {stops[:2]}")
        return ""
    return stops[0][len(expected):]


def check_train(work: Path, finished: bool, kept: str, result: Outcome) -> None:
    run = work / "run"
    incomplete, results = (run / "INCOMPLETE").is_file(), (run / "results.json").is_file()
    state = f"INCOMPLETE {'present' if incomplete else 'absent'}, results.json {'present' if results else 'absent'}"
    if finished or "training had finished" in kept:
        ok = results and not incomplete
    elif "marked INCOMPLETE" in kept:
        ok = incomplete and not results
    elif "nothing was written" in kept:
        ok = not run.exists() or (incomplete and not results)
    else:
        result.fail("outputs", f"unexpected kept text: {kept[:160]}")
        return
    if not ok:
        result.fail("outputs", f"{'exit 0' if finished else kept[:80]}: {state}")


def check_evaluate(work: Path, finished: bool, before: bytes, result: Outcome) -> None:
    path = work / "run" / "results.json"
    now = path.read_bytes() if path.is_file() else b""
    if not finished:
        if now != before:
            result.fail("outputs", "interrupted, but results.json changed")
        return
    if now == before:
        result.fail("outputs", "exit 0, but results.json unchanged")
        return
    try:
        ensemble = json.loads(now)["ensemble"]
        ras = [*ensemble["robust_accuracy"].values(), *(a["robust_accuracy"] for a in ensemble["attacks"].values())]
        ok = len(ras) > 2 and all(isinstance(r, (int, float)) for r in ras)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        ok, ras = False, [repr(exc)]
    if not ok:
        result.fail("outputs", f"exit 0, but results.json has no robust accuracies ({ras})")


def running_trials(db: Path) -> int:
    """How many trials study.db holds in state RUNNING (sqlite3; optuna if the schema is not the expected one)."""
    con = sqlite3.connect(db)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return 0  # the signal came before optuna created its tables
        try:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0]
        except sqlite3.OperationalError:
            pass
    finally:
        con.close()
    import optuna  # another schema: let optuna read it

    storage = f"sqlite:///{db}"
    return sum(t.state == optuna.trial.TrialState.RUNNING
               for s in optuna.get_all_study_summaries(storage)
               for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False))


def check_tune(work: Path, finished: bool, result: Outcome) -> None:
    study = work / "study"
    rows = None
    if (study / "trials.csv").is_file():
        try:
            with open(study / "trials.csv", newline="") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
            if not reader.fieldnames or "state" not in reader.fieldnames or any(
                    None in row or None in row.values() for row in rows):
                raise ValueError("a row does not match the header")
        except (OSError, ValueError, csv.Error) as exc:
            result.fail("outputs", f"trials.csv does not parse: {exc}")
            rows = None
    if finished:
        complete = sum(r["state"] == "COMPLETE" for r in rows or [])
        if complete != 2:
            result.fail("outputs", f"exit 0 with {complete} COMPLETE trial(s) in trials.csv, not 2")
    if (study / "study.db").is_file():
        try:
            if n := running_trials(study / "study.db"):
                result.fail("outputs", f"{n} trial(s) left RUNNING in study.db")
        except Exception as exc:  # noqa: BLE001 (a damaged database is a finding, not a crash of the tool)
            result.fail("outputs", f"study.db unreadable: {type(exc).__name__}: {exc}")


# --- a try -----------------------------------------------------------------------------------


def keep_failed(run: Launched, dest: Path, with_ray_logs: bool) -> None:
    """Copy a failed try's folder (and its Ray temp dir's logs) to ``dest``, without files over 1 MiB."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        left_out = []
        for name in names:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                left_out.append(name)
                continue
            if not (os.path.isdir(os.path.join(folder, name)) or (os.path.isfile(os.path.join(folder, name))
                                                                   and st.st_size <= KEEP_FILE_BYTES)):
                left_out.append(name)
        return left_out

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(run.work, dest, symlinks=True, ignore=ignore, ignore_dangling_symlinks=True)
    if with_ray_logs and os.path.isdir(run.ray_tmp):
        shutil.copytree(run.ray_tmp, dest / "ray-tmp", symlinks=True, ignore=ignore, ignore_dangling_symlinks=True)


def check_exit(code: int | None, sig: signal.Signals, running: bool, took: float, output: str,
               written: list[str], result: Outcome) -> str:
    """The exit code, the time to exit and the output; returns the outcome's name for the table."""
    check_output(output, result)
    if code == -sig:  # the signal's default action: only before Python ran any fedrobust code
        if output.strip() or written:
            result.fail("default action", f"output {output.strip()[-160:]!r}; wrote {written[:5]}")
        return "default"
    if code is not None and code not in (0, 128 + sig):
        last = next((ln for ln in reversed(output.splitlines()) if ln.startswith("fedrobust: ")), "")
        result.fail("exit code", f"{code}, expected {128 + sig} or 0 (running at the signal: {running}) {last[:160]}")
    if code is not None and took > EXIT_WITHIN_S:
        result.fail("slow exit", f"{took:.1f} s after the signal")
    return {128 + sig: str(128 + sig), 0: "0", None: "hung"}.get(code, f"exit {code}")


def check_leftovers(run: Launched, session: Session, result: Outcome) -> None:
    """No half-written file, no process of the try alive 10 s after its exit (killed by id), no Ray temp or scratch."""
    tmp_files = [*run.work.rglob(".*.tmp"), *session.cache.rglob(".*.tmp")]
    if tmp_files:
        result.fail("tmp files", ", ".join(str(p) for p in tmp_files[:5]))
    left = wait_for_none_left(run, LEFT_WITHIN_S)
    if left:
        result.fail("processes left", "; ".join(f"{pid} {cmd}" for pid, cmd in sorted(left.items())))
        kill_pids(list(left))
    if os.path.isdir(run.ray_tmp) and os.listdir(run.ray_tmp):
        result.fail("ray temp left", f"{folder_bytes(Path(run.ray_tmp)) / 1024:.0f} KiB in {run.ray_tmp}")
    scratch = run.work / "scratch"
    if scratch.is_dir() and any(scratch.iterdir()):
        result.fail("scratch left", ", ".join(sorted(p.name for p in scratch.iterdir())[:5]))


def one_try(command: str, sig: signal.Signals, index: int, period: float, session: Session) -> dict:
    """Run one try: start the command, signal it after a random delay, check how it stopped; the try's record."""
    delay = random.Random(f"{session.seed}-{command}-{sig.name}-{index}").uniform(0.0, DELAY_SPAN * period)
    name = f"{command}-{sig.name}-{index:03d}"
    work = session.out / "work" / name
    t0 = time.monotonic()
    prepare(command, work, session)
    results_before = (work / "run" / "results.json").read_bytes() if command == "evaluate" else b""
    before = snapshot(work)
    run = launch(fedrobust_args(command, work), work, session)
    result = Outcome()
    try:
        time.sleep(max(0.0, run.started + delay - time.monotonic()))
        running = run.proc.poll() is None
        sent = time.monotonic()
        run.proc.send_signal(sig)  # the process only, as `kill -INT PID` does; nothing if it has ended
        try:
            code = run.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            code = None
            result.fail("hung", f"still running {WAIT_S:.0f} s after the signal")
            stop_all(run)
        took = time.monotonic() - sent if running else 0.0
        output = run.log.read_text(errors="replace")
        written = sorted(p for p, facts in snapshot(work).items() if before.get(p) != facts)
        outcome = check_exit(code, sig, running, took, output, written, result)
        if code in (0, 128 + sig):
            kept = check_messages(output, sig, code != 0, result)
            if command in ("train", "train-inline"):
                check_train(work, code == 0, kept, result)
            elif command == "evaluate":
                check_evaluate(work, code == 0, results_before, result)
            else:
                check_tune(work, code == 0, result)
        check_leftovers(run, session, result)
        line = next((ln for ln in output.splitlines() if ln.startswith("fedrobust: ")), "")
        record = {"command": command, "signal": sig.name, "index": index, "delay": round(delay, 3),
                  "T": round(period, 3), "fraction": round(delay / period, 4), "running_at_signal": running,
                  "exit_code": code, "outcome": outcome, "seconds_to_exit": round(took, 3),
                  "passed": not result.reasons, "reasons": result.reasons, "details": result.details,
                  "line": line[:300], "root": str(session.root), "commit": session.commit,
                  "try_seconds": None, "at": time.strftime("%Y-%m-%d %H:%M:%S")}
        if result.reasons:
            record["output_tail"] = output[-3000:]
            others = [r for r in result.reasons if r != "ray temp left"]
            keep_failed(run, session.out / "failed" / name, with_ray_logs=bool(others))
            (session.out / "failed" / name / "record.json").write_text(json.dumps(record, indent=1) + "\n")
    finally:
        stop_all(run)
        shutil.rmtree(run.ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    record["try_seconds"] = round(time.monotonic() - t0, 2)
    return record


# --- the table -------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict]:
    """The tries recorded in ``path`` (a line cut short by a stopped run is skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def report(records: list[dict]) -> str:
    """The table: per root, command and signal, tries, passes, outcomes, failures by reason and their moments."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [f"machine: {os.cpu_count()} cores, load average {load} (1, 5, 15 min)"]
    if not records:
        return "\n".join([*lines, "no tries recorded"])
    for root in dict.fromkeys(r["root"] for r in records):
        mine = [r for r in records if r["root"] == root]
        commits = ", ".join(dict.fromkeys(r["commit"] for r in mine))
        lines += ["", f"root {root}   commit {commits}",
                  f"{'command':<13}{'signal':<8}{'tries':>6}{'passed':>7}{'failed':>7}  {'T s':>5} {'s/try':>6}"
                  f"  {'outcomes':<26}failures by reason"]
        groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for r in sorted(mine, key=lambda r: (COMMANDS.index(r["command"]), r["signal"], r["index"])):
            groups[(r["command"], r["signal"])].append(r)
        moments = []
        for (command, sig), rows in groups.items():
            failed = [r for r in rows if not r["passed"]]
            outcomes = " ".join(f"{k}:{n}" for k, n in Counter(r["outcome"] for r in rows).most_common())
            reasons = Counter(reason for r in failed for reason in r["reasons"])
            per_try = sum(r["try_seconds"] or 0 for r in rows) / len(rows)
            lines.append(f"{command:<13}{sig:<8}{len(rows):>6}{len(rows) - len(failed):>7}{len(failed):>7}  "
                         f"{rows[-1]['T']:>5.1f} {per_try:>6.1f}  {outcomes:<26}"
                         + (", ".join(f"{k} {n}" for k, n in reasons.most_common()) or "-"))
            for reason in reasons:
                hit = sorted((r for r in failed if reason in r["reasons"]), key=lambda r: r["delay"])
                moments.append(f"  {command} {sig} {reason} ({len(hit)}): "
                               + " ".join(f"{r['delay']:.1f}s/{r['fraction']:.2f}T" for r in hit))
        if moments:
            lines += ["moments of the failures (delay in s / fraction of T), by reason:", *moments]
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------


def parse_tries(args: argparse.Namespace) -> dict[str, int]:
    """Tries per signal for each command, from --tries or --tries-per-command (defaults for the rest)."""
    tries = dict(DEFAULT_TRIES)
    if args.tries is not None:
        tries = dict.fromkeys(COMMANDS, args.tries)
    for item in filter(None, (args.tries_per_command or "").split(",")):
        command, _, n = item.partition("=")
        if command not in COMMANDS or not n.isdigit():
            raise SystemExit(f"signal_stress: error: --tries-per-command: {item!r} is not COMMAND=N "
                             f"(commands: {', '.join(COMMANDS)})")
        tries[command] = int(n)
    return tries


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="results folder (tries.jsonl; a rerun resumes it)")
    p.add_argument("--root", type=Path, default=REPO, help="the checkout to run (default: this repository)")
    p.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated, from " + ", ".join(COMMANDS))
    p.add_argument("--signals", default="INT,TERM", help="comma-separated: INT, TERM")
    how_many = p.add_mutually_exclusive_group()
    how_many.add_argument("--tries", type=int, help="tries per signal for every command")
    how_many.add_argument("--tries-per-command", help="e.g. train=100,tune=40 (others: train 100, else 40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the delays")
    p.add_argument("--report", action="store_true", help="print the table of OUT's tries and exit")
    args = p.parse_args()
    out = args.out.resolve()
    records_path = out / "tries.jsonl"
    if args.report:
        print(report(read_records(records_path)))
        return 0
    commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    if unknown := [c for c in commands if c not in COMMANDS]:
        p.error(f"--commands: unknown {unknown} (choose from {', '.join(COMMANDS)})")
    try:
        signals = [signal.Signals["SIG" + s.strip().upper().removeprefix("SIG")] for s in args.signals.split(",")]
    except KeyError as exc:
        p.error(f"--signals: unknown signal {exc}")
    if bad := [s.name for s in signals if s not in (signal.SIGINT, signal.SIGTERM)]:
        p.error(f"--signals: only INT and TERM, not {bad}")
    tries = parse_tries(args)
    root = args.root.resolve()
    if not (root / "fedrobust" / "cli.py").is_file():
        p.error(f"--root: {root} is not a fedrobust checkout")
    out.mkdir(parents=True, exist_ok=True)
    session = Session(out=out, root=root, commit=git_commit(root), cache=out / "cache", seed=args.seed)
    session.cache.mkdir(exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill PID` stops the tool as Ctrl-C does: cleanly

    done = {(r["command"], r["signal"], r["index"], r["root"]) for r in read_records(records_path)}
    todo = [(i, c, s) for i in range(max(tries[c] for c in commands)) for c in commands for s in signals
            if i < tries[c] and (c, s.name, i, str(root)) not in done]
    print(f"{len(todo)} tries to run against {root} ({session.commit}); results in {records_path}", flush=True)
    try:
        periods = {c: calibrate(c, session) for c in commands if any(t[1] == c for t in todo)}
        for n, (index, command, sig) in enumerate(todo, 1):
            record = one_try(command, sig, index, periods[command], session)
            with open(records_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            verdict = "passed" if record["passed"] else "FAILED: " + "; ".join(record["details"])[:300]
            print(f"[{n}/{len(todo)}] {command} {sig.name} #{index} at {record['delay']:.1f} s "
                  f"({record['fraction']:.2f} T): {record['outcome']} after {record['seconds_to_exit']:.1f} s, "
                  f"{verdict}", flush=True)
    except KeyboardInterrupt:
        print("signal_stress: interrupted; the tries recorded are kept: run the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        if session.base_run is not None:
            shutil.rmtree(session.base_run.parent, ignore_errors=True)
    print(report(read_records(records_path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
