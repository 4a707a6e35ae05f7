"""Both engines, end to end through the CLI, and the run directory they write."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fedrobust import load_ensemble
from fedrobust.cli import main

FAST = ["train.progress=false", "train.epochs=3", "train.batch_size=64"]


def _weights(run_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    return {
        int(p.stem.split("_")[1]): torch.load(p, map_location="cpu", weights_only=True)
        for p in (run_dir / "members").glob("member_*.pt")
    }


def _assert_same_members(a: Path, b: Path):
    wa, wb = _weights(a), _weights(b)
    assert sorted(wa) == sorted(wb) == [0, 1, 2]
    for m in wa:
        assert wa[m].keys() == wb[m].keys()
        for k in wa[m]:
            assert torch.equal(wa[m][k], wb[m][k]), f"member {m}: {k} differs"


@pytest.mark.slow
def test_simulation_and_inline_engines_give_identical_members(tmp_path):
    # (one round of plain on a local instance equals inline too: tests/test_cluster.py runs it on a cluster)
    sim, inline = tmp_path / "sim", tmp_path / "inline"
    # EDLCM over two rounds: each node's dispersion term uses the members its peers sent after round 1,
    # through Flower's records in the simulation, and the trainer state carried in the Flower Context
    # continues each member's training; both must match the inline engine bit for bit.
    edlcm = ["strategy=edlcm", "train.rounds=2", "train.progress=false", "train.epochs=2", "train.batch_size=64"]
    assert main(["train", "engine=inline", *edlcm, f"run_dir={inline}"]) == 0
    assert main(["train", "engine=simulation", *edlcm, f"run_dir={sim}"]) == 0
    _assert_same_members(sim, inline)

    # the run directory
    for name in ("config.yaml", "train.log", "partition.csv", "results.json"):
        assert (sim / name).is_file(), name
    cfg = OmegaConf.load(sim / "config.yaml")
    assert cfg.engine.name == "simulation" and cfg.train.epochs == 2 and cfg.strategy.name == "edlcm"
    results = json.loads((sim / "results.json").read_text())
    acc = results["ensemble"]["clean_accuracy"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert [m["node"] for m in results["members"]] == [0, 1, 2]
    assert all(m["num_train_samples"] > 0 and 0.0 <= m["clean_accuracy"] <= 1.0 for m in results["members"])
    ens = load_ensemble(sim)
    assert len(ens.members) == 3 and not ens.training
    assert "round 2/2" in (sim / "train.log").read_text()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(sim / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for node in range(3):
        wanted = [f"{m}/node{node}" for m in ("train_loss", "val_loss", "train_acc", "val_acc")]
        for tag in [*wanted, f"loss_terms/node{node}/dispersion"]:
            assert tag in tags
            assert len(ea.Scalars(tag)) == 2  # one point per epoch
    assert ea.Scalars("ensemble/clean_accuracy")[0].value == pytest.approx(acc)


@pytest.mark.parametrize(
    "deployment,nodes,members",
    [("centralized", 1, 1), ("deep_ensemble", 1, 3), ("distributed_iid", 3, 3), ("distributed_dirichlet", 4, 4)],
)
def test_each_deployment_trains_inline(tmp_path, deployment, nodes, members):
    run = tmp_path / "run"
    n = "deployment.num_nodes=4" if deployment == "distributed_dirichlet" else "deployment.num_nodes=3"
    overrides = [] if deployment == "centralized" else [n]
    assert main(["train", "engine=inline", f"deployment={deployment}", *overrides,
                 "train.progress=false", "train.epochs=1", f"run_dir={run}"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["ensemble"]["num_members"] == members
    assert len({m["node"] for m in results["members"]}) == nodes
    total = sum(m["num_train_samples"] + m["num_val_samples"] for m in results["members"])
    if deployment.startswith("distributed"):
        assert total == 1437  # disjoint shards cover the training set
    else:
        assert all(m["num_train_samples"] + m["num_val_samples"] == 1437 for m in results["members"])
    seeds_differ = deployment == "deep_ensemble"
    if seeds_differ:
        w = _weights(run)
        assert not torch.equal(w[0]["1.classifier.weight"], w[1]["1.classifier.weight"])
    # the plain strategy's one loss term, per node (per member on a deep ensemble's one node)
    assert results["strategy"] == "plain" and results["strategy_grad"] is None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    who = [f"node0_member{m}" for m in range(3)] if deployment == "deep_ensemble" else [f"node{n}" for n in range(nodes)]
    assert {f"loss_terms/{w}/ce" for w in who} <= set(ea.Tags()["scalars"]), sorted(ea.Tags()["scalars"])


def test_default_run_dir_is_timestamped_under_runs(tmp_path):
    assert main(["train", "engine=inline", "deployment=centralized", "train.progress=false", "train.epochs=1"]) == 0
    (run,) = list((tmp_path / "runs").iterdir())
    assert (run / "results.json").is_file()


def test_a_private_ray_instance_gets_no_more_cpus_than_its_virtual_nodes_can_use(monkeypatch):
    """Flower starts one client actor per ``engine.num_cpus`` of the instance, each importing torch:
    on a 64-core machine three nodes must not start 64 actors."""
    from fedrobust.config import load_config
    from fedrobust.engines import backend_config

    monkeypatch.setattr(os, "cpu_count", lambda: 64)

    def cpus(*overrides, num_cpus=None):
        return backend_config(load_config(list(overrides)), num_cpus)["init_args"].get("num_cpus")

    assert cpus() == 3  # the default federation: three nodes, one CPU each
    assert cpus("deployment=centralized") == cpus("deployment=deep_ensemble") == 1  # one node, its members in turn
    assert cpus("deployment.num_nodes=100") == 64  # no more than the machine has
    assert cpus("engine.num_cpus=2") == 6 and cpus("engine.num_cpus=0.5") == 2
    assert cpus("deployment.num_nodes=10", num_cpus=4) == 4  # a tuning trial's share of a machine
    assert cpus("engine.ray_address=auto") is None  # a cluster's own resources decide


@pytest.mark.slow
def test_a_crashed_simulation_runtime_fails_at_once_in_one_line(tmp_path, monkeypatch):
    # The actor pool cannot be built (Ray refuses, a node vanished, ...): the ServerApp must not wait for replies.
    # (What the child process runs, here, so that the patch reaches it; the child's one line reaches the
    # command line as its error: tests/test_trial_stops.py)
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedrobust.engines import SimulationError
    from in_process import simulate_here

    def crash(self, app_fn):
        raise RuntimeError("forced crash of the actor pool")

    monkeypatch.setattr(raybackend.RayBackend, "build", crash)
    t0 = time.perf_counter()
    with pytest.raises(SimulationError, match="forced crash of the actor pool") as exc:
        simulate_here(["train.progress=false"], tmp_path / "run")
    assert len(str(exc.value).splitlines()) == 1
    assert time.perf_counter() - t0 < 45  # Ray's start-up; before the fix it never returned
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_a_node_lost_mid_simulation_is_dropped_with_min_members(tmp_path, monkeypatch):
    # (with engine.on_missing=fail the round fails naming the node: tests/test_ensemble.py, without Ray)
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from in_process import simulate_here

    from fedrobust.config import load_config
    from fedrobust.engines import launch_order

    original = raybackend.RayBackend.process_message
    overrides = ["train.progress=false", "train.epochs=1", "engine.on_missing=min_members", "engine.min_members=2"]
    node_2 = launch_order(load_config(overrides)).index(2)  # the virtual SuperNode that trains node 2

    def lose_node_2(self, message, context):  # as when the machine running node 2's client dies
        if int(context.node_config["partition-id"]) == node_2:
            raise raybackend.ray.exceptions.ActorDiedError()
        return original(self, message, context)

    monkeypatch.setattr(raybackend.RayBackend, "process_message", lose_node_2)
    run = simulate_here(overrides, tmp_path / "run")
    results = json.loads((run / "results.json").read_text())
    assert [m["node"] for m in results["members"]] == [0, 1]
    assert results["missing"]["nodes"] == [2] and results["missing"]["members"] == [2]
    (lost,) = results["missing"]["flower_node_ids"]
    log = (run / "train.log").read_text()
    assert f"flower node {lost} failed in round 1: " in log and f"flower node(s) [{lost}] failed" in log, log[-2000:]
