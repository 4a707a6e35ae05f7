"""A real deployment on loopback: SuperLink and SuperNodes as separate processes, TLS, SuperNode authentication.

Credentials come from ``fedrobust deploy``; the run is submitted with ``fedrobust deploy run``, which
exits with the run's final status. Every process is started in its own session and killed with its
group when the test ends, whatever the outcome. The launchers' flag checks run first, without one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedrobust.cli import main as cli
from fedrobust.deploy import make_certificates, make_supernode_keys
from shared_cache import cache_dir

# under pytest-xdist one worker runs this module, so one federation is built once
pytestmark = pytest.mark.xdist_group("deploy")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# ------------------------------------------------------------ flags that go together --
@pytest.fixture(scope="module")
def credentials(tmp_path_factory):
    d = tmp_path_factory.mktemp("credentials")
    make_certificates(d / "certs")
    make_supernode_keys(d / "keys", ["node0"])
    return d


_NODE = ["deploy", "supernode", "--superlink", "127.0.0.1:9", "--partition-id", "0", "--num-partitions", "3"]
REFUSED = {  # argv (paths relative to the credentials folder) -> what the one line names; flags that go together first
    "ca without key": ([*_NODE, "--ca", "certs/ca.crt"], "--key: required with --ca"),
    "key without ca": ([*_NODE, "--key", "keys/node0"], "--key: needs --ca"),
    "key with insecure": ([*_NODE, "--key", "keys/node0", "--insecure"], "--key: needs --ca"),
    "ca and key with insecure": ([*_NODE, "--ca", "certs/ca.crt", "--key", "keys/node0", "--insecure"],
                                 "--ca and --insecure"),
    "public key as key": ([*_NODE, "--ca", "certs/ca.crt", "--key", "keys/node0.pub"], "is a public key"),
    "private key as ca": ([*_NODE, "--ca", "keys/node0", "--key", "keys/node0"], "--ca: keys/node0 is not a PEM"),
    "neither": (_NODE, "--ca: required"),
    "superlink certs with insecure": (["deploy", "superlink", "--certs", "certs", "--insecure"], "--certs and --insecure"),
    "connection ca with insecure": (["deploy", "connection", "x", "--address", "127.0.0.1:9", "--ca", "certs/ca.crt",
                                     "--insecure"], "--ca and --insecure"),
    "run with a bad override": (["deploy", "run", "x", "train.nope=1"], "train.nope"),
    "run on an unknown connection": (["deploy", "run", "nosuch", "train.epochs=1"], "no [superlink.nosuch]"),
}


@pytest.fixture
def launches(credentials, monkeypatch):
    """Run ``fedrobust`` in the credentials folder; every program it would start is recorded, not started."""
    import fedrobust.deploy

    started: list[list[str]] = []
    monkeypatch.chdir(credentials)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FLWR_HOME", str(credentials / "flwr-home"))
    monkeypatch.setattr(os, "execvp", lambda prog, argv: started.append(list(argv)))
    monkeypatch.setattr(fedrobust.deploy.subprocess, "run", lambda argv, **kw: started.append(list(argv)))
    return started


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_deploy_input_is_refused_with_one_line_before_anything_starts(case, launches, credentials, capsys):
    argv, needle = REFUSED[case]
    before = sorted(p.relative_to(credentials) for p in credentials.rglob("*"))
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedrobust: error: ") and needle in err, err
    assert "Traceback" not in err
    assert launches == []  # nothing started
    assert sorted(p.relative_to(credentials) for p in credentials.rglob("*")) == before  # nothing written


def test_a_supernode_with_its_ca_and_key_starts_with_both(launches, capsys):
    assert cli([*_NODE, "--ca", "certs/ca.crt", "--key", "keys/node0"]) == 0
    [argv] = launches
    assert argv[0] == "flower-supernode" and "--insecure" not in argv
    assert argv[argv.index("--root-certificates") + 1].endswith("certs/ca.crt")
    assert argv[argv.index("--auth-supernode-private-key") + 1].endswith("keys/node0")
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------- a federation --
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


class Federation:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
                    "FEDROBUST_CACHE": str(cache_dir(root / "cache"))}
        self.port = _free_port()
        self.name = "fedrobust-test"

    def fedrobust(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedrobust.cli", *args], env=self.env, cwd=self.root,
                              capture_output=True, text=True, timeout=120)

    def run_argv(self, *overrides: str) -> list[str]:
        """The README's run command: ``fedrobust deploy run CONNECTION OVERRIDES...``."""
        return [sys.executable, "-m", "fedrobust.cli", "deploy", "run", self.name, *overrides, "--app", str(REPO)]

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "fedrobust.cli", "deploy", *args], env=self.env, cwd=self.root,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        p = self.procs[name]
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """One SuperLink and three registered SuperNodes for the module; the last test kills SuperNode 2."""
    tmp_path = tmp_path_factory.mktemp("federation")
    fed = Federation(tmp_path)
    try:
        assert fed.fedrobust("deploy", "certs", "certs").returncode == 0
        assert fed.fedrobust("deploy", "keys", "keys", "node0", "node1", "node2", "rogue").returncode == 0
        done = fed.fedrobust("deploy", "connection", fed.name, "--address", f"127.0.0.1:{fed.port}", "--ca", "certs/ca.crt")
        assert done.returncode == 0, done.stderr
        fed.start("superlink", "superlink", "--certs", "certs", "--port", str(fed.port))
        _wait(lambda: "Uvicorn running" in fed.log("superlink"), 60, "the SuperLink")
        for i in range(3):
            reg = fed.flwr("supernode", "register", str(tmp_path / "keys" / f"node{i}.pub"), fed.name)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for i in range(3):
            fed.start(f"node{i}", "supernode", "--superlink", f"127.0.0.1:{fed.port}", "--ca", "certs/ca.crt",
                      "--key", f"keys/node{i}", "--partition-id", str(i), "--num-partitions", "3", "--port", str(_free_port()))
        # an unregistered key: started now so that its refusal overlaps the other nodes' start-up
        fed.start("rogue", "supernode", "--superlink", f"127.0.0.1:{fed.port}", "--ca", "certs/ca.crt",
                  "--key", "keys/rogue", "--partition-id", "0", "--num-partitions", "3", "--port", str(_free_port()))
        for i in range(3):
            _wait(lambda i=i: "SuperNode ID" in fed.log(f"node{i}"), 60, f"SuperNode {i}")
        yield fed
    finally:
        fed.close()


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
def test_tls_authenticated_deployment_matches_simulation_and_refuses_unregistered_keys(federation, tmp_path):
    fed = federation
    # an unregistered key is refused at the SuperLink and its SuperNode gives up
    rogue = fed.procs["rogue"]
    _wait(lambda: rogue.poll() is not None, 90, "the unregistered SuperNode to be refused")
    assert rogue.returncode != 0
    assert "activate-node" in fed.log("superlink") and "2004" in fed.log("superlink")

    # a ServerApp that raises fails the command (flwr run alone exits 0): a run_dir the SuperLink cannot create
    occupied = tmp_path / "occupied"
    occupied.write_text("a file where the run directory would go\n")
    failed = subprocess.run(fed.run_argv("train.epochs=5", f"run_dir={occupied}"), env=fed.env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, (failed.stdout + failed.stderr)[-3000:]
    [line] = failed.stderr.splitlines()
    assert line.startswith("fedrobust: error: run ") and " finished:failed: " in line, line
    assert f"run_dir: {occupied} is a file" in line, line
    assert "Traceback" in failed.stdout  # the ServerApp's own traceback is in the streamed log, not on stderr

    run_dir = tmp_path / "run-deployed"
    sub = subprocess.run(fed.run_argv("train.epochs=5", f"run_dir={run_dir}"), env=fed.env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert sub.returncode == 0, (sub.stdout + sub.stderr)[-3000:]
    assert sub.stderr == "" and sub.stdout.splitlines()[-1].endswith(" finished:completed"), sub.stderr[-3000:]
    deployed = _results(run_dir)
    assert sorted(m["node"] for m in deployed["members"]) == [0, 1, 2]  # the rogue node contributed nothing
    assert "missing" not in deployed

    # inline, which gives the simulation's members bit for bit (tests/test_engines.py, tests/test_cluster.py)
    assert cli(["train", "engine=inline", "train.epochs=5", "train.progress=false", f"run_dir={tmp_path / 'run-sim'}"]) == 0
    simulated = _results(tmp_path / "run-sim")
    assert abs(deployed["ensemble"]["clean_accuracy"] - simulated["ensemble"]["clean_accuracy"]) <= 0.02


@pytest.mark.slow
def test_a_supernode_killed_mid_training_leaves_the_run_to_finish_with_min_members(federation, tmp_path):
    fed = federation
    run_dir = tmp_path / "run-killed"
    # the round ends at the timeout or when the SuperLink finds the killed node's heartbeats missing (Flower's
    # 30 s interval, 2 missed: up to a minute), whichever comes first; the live nodes replied after 8-9 s
    # with this file run alone, 13 s beside two other pytest workers
    argv = fed.run_argv("train.epochs=10", "engine.timeout=40", "engine.on_missing=min_members", "engine.min_members=2",
                        f"run_dir={run_dir}")
    log_path = tmp_path / "deploy-run.log"
    with open(log_path, "w") as log:
        sub = subprocess.Popen(argv, env=fed.env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        try:
            _wait(lambda: "round 1/1: training" in log_path.read_text(errors="replace"), 120, "training to start")
            time.sleep(2.0)
            fed.kill("node2")
            assert sub.wait(timeout=300) == 0, log_path.read_text()[-3000:]
        finally:
            if sub.poll() is None:
                os.killpg(sub.pid, signal.SIGKILL)
    assert (run_dir / "results.json").is_file(), log_path.read_text()[-3000:]
    results = _results(run_dir)
    assert sorted(m["node"] for m in results["members"]) == [0, 1]
    assert results["missing"]["nodes"] == [2] and results["missing"]["members"] == [2]
    assert len(results["missing"]["flower_node_ids"]) == 1
    assert results["warnings"] and "node(s) [2]" in results["warnings"][0]
    # the log names the lost node by its Flower id (not the SuperLink's, which sends the error reply)
    lost, log = results["missing"]["flower_node_ids"][0], (run_dir / "train.log").read_text()
    assert f"flower node(s) [{lost}] failed" in log or f"no reply from flower node(s) [{lost}]" in log, log[-3000:]
    assert log.count("round 1: reply ") == 3 - (f"no reply from flower node(s) [{lost}]" in log), log[-3000:]
