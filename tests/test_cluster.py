"""Studies and simulations on a real 2-node Ray cluster on 127.0.0.1, and life beside one.

The cluster is two ``ray start`` processes (tests/raycluster.py), each with
one CPU, a custom resource, and its own scratch space and cache, so that a
trial or a client that lands on a node shows it. The test that kills the
worker node runs last; the fixture stops every process it started, by id,
whatever happens.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedrobust.tuning.outputs import read_trials_csv
from raycluster import LocalCluster

# under pytest-xdist one worker runs this module, so one Ray cluster is built once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cluster")]

# A digits study small enough for the suite (as in test_tuning.py).
TINY = [
    "engine=inline", "train.epochs=2", "train.progress=false", "attack.num_samples=60", "attack.surrogates=[cnn]",
    "attack.surrogate_epochs=3", "attack.transfer_attacks=[cwa]", "attack.transfer_steps=3",
    "attack.query_attacks=[square_linf]", "attack.queries=20", "attack.whitebox=[]", "attack.tsr=false",
    "attack.hessian_samples=0", "attack.per_member=false",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster")
    c = LocalCluster()
    c.root = root
    try:
        # Each node has its own scratch root and its own cache: nothing is shared but Ray.
        c.start_head(num_cpus=1, resources={"head": 1},
                     env={"FEDROBUST_SCRATCH": str(root / "head-scratch"), "FEDROBUST_CACHE": str(root / "head-cache")})
        c.add_worker(num_cpus=1, resources={"worker": 1},
                     env={"FEDROBUST_SCRATCH": str(root / "worker-scratch"),
                          "FEDROBUST_CACHE": str(root / "worker-cache")})
        c.ids = c.node_ids(expect=2)  # resource name -> Ray node id
        yield c
    finally:
        c.shutdown()


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _tune_cmd(study: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedrobust.cli", "tune", f"study_dir={study}", "tune.n_trials=4",
            "tune.population_size=2", "tune.max_concurrent=2", f"ray.address={address}", "tune.max_accuracy_drop=0.3",
            *TINY, *extra]


def _short(node_id: str) -> str:
    return node_id[:8]


def _events(study: Path) -> list[dict]:
    path = study / "executions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _dominates(a, b) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def test_study_runs_on_both_nodes_and_ships_every_run_home(cluster, tmp_path):
    study = tmp_path / "study"
    done = subprocess.run(_tune_cmd(study, cluster.address), capture_output=True, text=True, timeout=900, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_trials_csv(study / "trials.csv")
    assert len(rows) == 4 and all(r["state"] == "COMPLETE" for r in rows)
    head, worker = _short(cluster.ids["head"]), _short(cluster.ids["worker"])
    assert {r["node"].split("/")[1] for r in rows} == {head, worker}  # both nodes ran trials (IP/short id)
    for r in rows:
        r["node"] = r["node"].split("/")[1]

    # Every trial's whole run directory is in the study directory, written by the tuner.
    for r in rows:
        run = study / "trials" / f"trial_{r['number']:04d}"
        assert r["run_dir"] == str(run)
        for name in ("config.yaml", "train.log", "partition.csv", "results.json", "eval_sample.json"):
            assert (run / name).stat().st_size > 0, (run, name)
        assert len(list((run / "members").glob("member_*.pt"))) == 3
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        results = json.loads((run / "results.json").read_text())
        assert results["ensemble"]["robust_accuracy"]["transfer"] == r["ra_t"]
        assert _short(results["trial_node"]["node_id"]) == r["node"]
    assert not list((study / "trials").glob("*.partial"))

    # A trial works in its node's scratch space, never in the study directory; the scratch is emptied after.
    starts = {e["key"]: e for e in _events(study) if e["event"] == "start"}
    assert sorted(starts) == sorted(r["number"] for r in rows)
    scratch = {head: cluster.root / "head-scratch", worker: cluster.root / "worker-scratch"}
    for r in rows:
        work = Path(starts[r["number"]]["work_dir"])
        assert work.parent == scratch[r["node"]], (r["number"], work)
        name = f"trial_{r['number']:04d}"
        log = (study / "trials" / name / "train.log").read_text()
        assert f"run directory: {work / name}" in log
        assert str(study) not in log.split("run directory:")[1].splitlines()[0]
    for path in scratch.values():
        assert path.is_dir() and not any(path.iterdir())

    # The zoo was trained once, by the tuner; each node received it once through the object store.
    assert done.stderr.count("surrogates: trained zoo") == 1
    received = collections.Counter()
    for r in rows:
        log = (study / "trials" / f"trial_{r['number']:04d}" / "train.log").read_text()
        assert "surrogates: reused cached zoo" in log and "trained zoo" not in log
        received[r["node"]] += log.count("received 2 cache file(s) from the tuner")
    assert received == {head: 1, worker: 1}
    for node in ("head", "worker"):
        assert len(list((cluster.root / f"{node}-cache" / "surrogates").glob("*.pt"))) == 1

    # pareto.json is the non-dominated feasible subset of trials.csv, computed here independently.
    doc = json.loads((study / "pareto.json").read_text())
    feasible = [r for r in rows if r["ca"] >= doc["min_accuracy"]]
    assert all(r["feasible"] == (r["ca"] >= doc["min_accuracy"]) for r in rows)
    expected = {r["number"] for r in feasible
                if not any(_dominates((q["ra_t"], q["ra_q"]), (r["ra_t"], r["ra_q"])) for q in feasible)}
    assert {t["number"] for t in doc["trials"]} == expected and expected


def test_a_study_with_a_loss_file_ships_the_expression_not_the_path(cluster, tmp_path):
    """``attack.whitebox_loss=file:search/best.json``, relative to the tuner's folder: read once when the config
    is loaded, so the trials (on both nodes, whose workers run elsewhere, where no such file is) use the
    expression, and their configs and results say so."""
    expression = "Neg(Mul(q, Log(Softmax(p))))"
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "best.json").write_text(json.dumps({"format": "fedrobust-loss/1", "expression": expression,
                                                               "fitness": 0.5}))
    study = tmp_path / "study"
    cmd = _tune_cmd(study, cluster.address, "tune.n_trials=2", "attack.whitebox=[pgd]", "attack.whitebox_steps=2",
                    "attack.whitebox_loss=file:search/best.json")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not any(e["event"] == "start" for e in _events(study)) and time.monotonic() < deadline \
                and proc.poll() is None:
            time.sleep(0.05)
        (tmp_path / "search" / "best.json").unlink()  # gone before any trial evaluates: none can read it
        _, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    rows = read_trials_csv(study / "trials.csv")
    assert len(rows) == 2 and all(r["state"] == "COMPLETE" for r in rows), rows
    for r in rows:
        run = study / "trials" / f"trial_{r['number']:04d}"
        cfg = (run / "config.yaml").read_text()
        assert "file:" not in cfg, cfg  # the loss itself is the expression; the file is provenance only
        assert "whitebox_loss: expr:" in cfg and "whitebox_loss: search/best.json" in cfg, cfg
        entry = json.loads((run / "results.json").read_text())["ensemble"]["attacks"]["whitebox_pgd"]
        assert entry["loss"].startswith("expr:") and entry["loss_file"] == "search/best.json", entry
        assert "Softmax(p)" in entry["loss_expression"], entry


def _members(run: Path) -> dict[int, dict[str, torch.Tensor]]:
    return {int(p.stem.split("_")[1]): torch.load(p, map_location="cpu", weights_only=True)
            for p in (run / "members").glob("member_*.pt")}


def test_simulation_spreads_over_the_cluster_and_equals_inline(cluster, tmp_path):
    common = ["deployment.num_nodes=4", "train.epochs=3", "train.batch_size=64", "train.progress=false"]
    sim, inline = tmp_path / "sim", tmp_path / "inline"
    done = subprocess.run([sys.executable, "-m", "fedrobust.cli", "train", "engine=simulation",
                           f"engine.ray_address={cluster.address}", *common, f"run_dir={sim}"],
                          capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    from fedrobust.cli import main

    assert main(["train", "engine=inline", *common, f"run_dir={inline}"]) == 0
    a, b = _members(sim), _members(inline)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for m in a:
        for k in a[m]:
            assert torch.equal(a[m][k], b[m][k]), f"member {m}: {k} differs"
    trained_on = [m["trained_on"]["node_id"] for m in json.loads((sim / "results.json").read_text())["members"]]
    assert set(trained_on) == {cluster.ids["head"], cluster.ids["worker"]}  # both Ray nodes trained members


def test_default_train_beside_a_running_cluster_uses_a_private_instance(cluster, tmp_path):
    # RAY_ADDRESS points at the cluster, as on the machine of anyone who scales out.
    env = _env() | {"RAY_ADDRESS": cluster.address}
    t0 = time.perf_counter()
    # the default command with fewer epochs: what is tested is how Ray is started, not how long it trains
    # (4 epochs gave 0.57 inline, and the simulation's members equal inline's; untrained ones give about 0.1)
    done = subprocess.run([sys.executable, "-m", "fedrobust.cli", "train", "train.epochs=4", "train.progress=false",
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["ensemble"]["clean_accuracy"] > 0.4 and len(results["members"]) == 3
    assert not {m["trained_on"]["node_id"] for m in results["members"]} & set(cluster.ids.values())
    assert time.perf_counter() - t0 < 240


def test_losing_the_worker_node_mid_study_requeues_its_trials(cluster, tmp_path):
    study = tmp_path / "study"
    worker_id = _short(cluster.ids["worker"])

    def node(e):
        return (e.get("node") or "/").split("/")[-1]

    # a given baseline accuracy: no baseline run before the trials (the study test above runs one)
    proc = subprocess.Popen(_tune_cmd(study, cluster.address, "tune.baseline_accuracy=0.5"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if any(e["event"] == "start" and node(e) == worker_id for e in _events(study)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the study ended before the worker node could be killed"
        killed_at = time.time()
        cluster.nodes[1].kill()  # SIGKILL every process of the worker node, mid-trial
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    rows = read_trials_csv(study / "trials.csv")
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(complete) == 4
    events = _events(study)
    ends = collections.Counter(e["key"] for e in events if e["event"] == "end")
    assert all(ends[r["number"]] == 1 for r in complete) and sum(ends.values()) == 4  # none recorded twice
    lost = {e["key"] for e in events if e["event"] == "lost"}
    noticed = min(e["time"] for e in events if e["event"] == "lost") - killed_at
    print(f"the tuner noticed the lost node {noticed:.1f}s after the kill")
    assert noticed < 90
    assert lost and all(node(e) == worker_id for e in events if e["event"] == "lost")
    failed = {r["number"]: r for r in rows if r["state"] == "FAIL"}
    assert set(failed) == lost
    requeued = [r for r in rows if r["requeued_from"] is not None]
    assert {r["requeued_from"] for r in requeued} == lost
    for r in requeued:  # the exact parameters again
        src = failed[r["requeued_from"]]
        assert all(r[k] == src[k] for k in ("optimizer.lr", "optimizer.momentum", "optimizer.weight_decay",
                                             "train.batch_size"))
    # after the loss, trials ran on the head node only
    last_lost = max(e["time"] for e in events if e["event"] == "lost")
    assert {node(e) for e in events if e["event"] == "start" and e["time"] > last_lost} == {
        _short(cluster.ids["head"])}
