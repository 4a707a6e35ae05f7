"""The node task on the wire: typed records of what a node uses, nothing more, checked on arrival."""

from __future__ import annotations

import dataclasses

import pytest
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedrobust import validation  # noqa: F401  (every section checked, as the CLI does)
from strategies.settings import STRATEGY_SCHEMAS
from fedrobust.config import load_config
from fedrobust.node import initial_weights, train_node_round
from fedrobust.data import load_dataset
from fedrobust.protocol import decode_task, encode_task
from fedrobust.task import NodeTask, ShardSpec, TaskError, node_task
from fedrobust.training import TrainSettings

SECRET = "s3cr3t-pa55"


def _wire(rd: RecordDict) -> RecordDict:
    """Through Flower's protobuf serialisation, as a message travels."""
    return recorddict_from_proto(recorddict_to_proto(rd))


@pytest.mark.parametrize("overrides", [
    [],
    ["strategy=edlcm", "strategy.clip_grad_norm=null", "data.root=null", "data.train_subset=500"],
    ["strategy=adversarial", "strategy.attack=fgsm", "deployment=deep_ensemble", "train.device=cpu",
     "engine.num_cpus=2", "train.progress=false", "data.augment=true"],
], ids=["plain", "edlcm-nulls", "adversarial"])
def test_a_task_survives_the_wire_exactly(overrides):
    cfg = load_config(overrides)
    task = node_task(cfg)
    peers = initial_weights(cfg, load_dataset("digits"), [1])
    got, round_idx, got_peers = decode_task(_wire(encode_task(task, 0, peers)))
    assert got == task and round_idx == 0
    assert set(got_peers) == {1} and all(got_peers[1][k].equal(v) for k, v in peers[1].items())
    assert got.strategy == cfg.strategy.name and got.threads == int(cfg.engine.num_cpus)


def test_the_task_carries_no_key_outside_its_fields():
    # a secret in tune.storage (or anywhere outside the task) can never reach a node
    cfg = load_config(["strategy=edlcm", f"tune.storage=postgresql://fed:{SECRET}@db.example.org/optuna",
                       f"run_dir=/runs/{SECRET}", f"study_dir=/studies/{SECRET}", f"attack.cache_dir=/c/{SECRET}",
                       f"ray.address=ray://{SECRET}:10001", "evaluate=true"])
    rd = encode_task(node_task(cfg), 3, {})
    allowed = {
        "task": {"version", "round", "num-rounds", "model", "seed", "device", "threads", "progress", "strategy", "null"},
        "task.train": {f.name for f in dataclasses.fields(TrainSettings)},
        "task.shard": {f.name for f in dataclasses.fields(ShardSpec)},
        "task.strategy": {f.name for f in dataclasses.fields(STRATEGY_SCHEMAS["edlcm"])} - {"name"},
    }
    assert set(rd.keys()) == set(allowed)
    for name, record in rd.items():
        assert isinstance(record, ConfigRecord)
        assert set(record.keys()) <= allowed[name], (name, set(record.keys()) - allowed[name])
        for value in record.values():
            assert SECRET not in str(value)
    words = {k for record in rd.values() for k in record.keys()}
    assert not words & {"tune", "attack", "storage", "run_dir", "study_dir", "ray", "engine", "evaluate", "config"}


def _mutated(change) -> RecordDict:
    rd = _wire(encode_task(node_task(load_config(["strategy=curvature"])), 0, {}))
    change(rd)
    return rd


def _set(record: str, key: str, value):
    def change(rd):
        rd[record][key] = value
    return change


def _drop(record: str, key: str | None = None):
    def change(rd):
        if key is None:
            del rd[record]
        else:
            del rd[record][key]
    return change


MALFORMED = [
    (_set("task.train", "lr", -0.1), "train.lr: must be > 0"),
    (_set("task.train", "lr", float("nan")), "train.lr: must be > 0"),
    (_set("task.train", "batch_size", "128"), "train.batch_size: expected int"),
    (_set("task.train", "momentum", True), "train.momentum: expected float"),
    (_set("task.train", "epochs", 0), "train.epochs: must be >= 1"),
    (_set("task.train", "precision", "fp8"), "train.precision: unknown value 'fp8'"),
    (_set("task.train", "learning_rate", 0.1), "task.train.learning_rate: unknown field"),
    (_drop("task.train", "patience"), "task.train.patience: missing"),
    (_set("task", "model", "nosuchnet"), "model: unknown value 'nosuchnet'"),
    (_set("task", "strategy", "nosuch"), "strategy: unknown strategy 'nosuch'"),
    (_set("task", "round", 1), "task.round: must be an int in [0, 1)"),
    (_set("task", "num-rounds", 50), "num-rounds: must be in [1, train.epochs=40]"),
    (_set("task", "version", 1), "task.version: this node reads version 2"),
    (_set("task", "device", "tpu"), "device: must be auto, cpu"),
    (_set("task", "threads", 0), "threads: must be >= 1"),
    (_set("task", "config", "{}"), "task.config: unknown field"),
    (_set("task", "null", ["train.lr"]), "task.null: 'train.lr' cannot be null"),
    (_set("task.shard", "data", "imagenet"), "shard.data: unknown value 'imagenet'"),
    (_set("task.shard", "num_nodes", 0), "shard.num_nodes: must be >= 1"),
    (_set("task.shard", "alpha", -1.0), "shard.alpha: must be > 0"),
    (_set("task.shard", "deployment", "ring"), "shard.deployment: unknown value 'ring'"),
    (_set("task.strategy", "alpha", -1.0), "strategy.alpha: must be >= 0"),
    (_set("task.strategy", "grad", "forward"), "strategy.grad: unknown value 'forward'"),
    (_set("task.strategy", "alpha", "big"), "strategy.alpha"),
    (_set("task.strategy", "gamma", 1.0), "strategy.gamma"),
    (_drop("task.shard"), "task.shard: missing record"),
    (_drop("task"), "task: missing record"),
    (lambda rd: rd.__setitem__("config", ConfigRecord({"config": "{}"})), "config: unknown record"),
]


@pytest.mark.parametrize("change, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_a_malformed_task_is_refused_in_one_line_naming_the_field(change, message):
    with pytest.raises(TaskError) as info:
        decode_task(_mutated(change))
    text = str(info.value)
    assert text.startswith("malformed task: ") and message in text and "\n" not in text, text


def test_the_node_trains_from_the_task_as_from_the_config():
    cfg = load_config(["train.epochs=1", "train.progress=false", "deployment=distributed_iid", "deployment.num_nodes=2",
                       "strategy=curvature", "strategy.every=2"])
    task, _, _ = decode_task(_wire(encode_task(node_task(cfg), 0, {})))
    (a,) = train_node_round(task, 1, 0, {})
    (b,) = train_node_round(cfg, 1, 0, {})
    assert a.weights.keys() == b.weights.keys() and all(a.weights[k].equal(b.weights[k]) for k in a.weights)
    assert a.history[0].terms == b.history[0].terms


def test_a_node_task_is_small_and_frozen():
    task = node_task(load_config([]))
    assert isinstance(task, NodeTask)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.model = "vgg16"
    moved = task.with_data_root("/mnt/data")
    assert moved.shard.root == "/mnt/data" and task.shard.root == "data"
