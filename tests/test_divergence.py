"""A member whose loss becomes non-finite: stopped at once, named, and never shipped as a member.

The NaN is forced: a test strategy makes member 2's loss NaN from epoch 2 on
(inline), or node 2's task asks for a learning rate of 1e30 from round 2
on (simulation, where the ClientApp runs in Ray's processes). Every JSON
file a run writes is read back with a strict parser.
"""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch

import strategies
from fedrobust.cli import main
from fedrobust.training import DivergedError, MemberTrainer, TrainSettings, member_seed, train_member
from strategies import LossTerms, Plain
from strict_json import assert_strict_json, loads_strict

FAST = ["train.progress=false", "train.epochs=3", "train.batch_size=64"]


class _NaNFromEpoch2(Plain):
    """Plain, except that the loss of the member seeded ``seed`` is NaN from epoch 2 on."""

    def __init__(self, seed: int = member_seed(0, 2), **kwargs):
        super().__init__(**kwargs)
        self.target, self.poisoned = seed, False

    def begin_epoch(self, model, epoch, epochs, x_val, y_val, seed, **kwargs):
        self.poisoned = seed == self.target and epoch >= 2
        return {}

    def loss(self, model, x, y, *, peers=()):
        out = super().loss(model, x, y, peers=peers)
        return LossTerms(out.total * math.nan, out.terms, out.logits) if self.poisoned else out


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("fedrobust: error:")]


def test_json_files_are_strict_with_non_finite_numbers_as_null(tmp_path):
    from fedrobust.atomic import write_json

    write_json(tmp_path / "x.json", {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": (2, -math.inf)}}, sort_keys=True)
    text = (tmp_path / "x.json").read_text()
    assert loads_strict(text) == {"a": None, "b": [None, 1.5], "c": {"d": [2, None]}}


# -------------------------------------------------------------- the trainer --
def _tiny(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(60, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    return x[:40], y[:40], x[40:], y[40:]


def _trainer(strategy, epochs=5):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    return MemberTrainer(model, *_tiny(), strategy, TrainSettings(lr=0.05, epochs=epochs, batch_size=8), seed=7)


def test_a_nan_training_loss_stops_the_member_at_once_with_its_epoch_and_last_finite_loss():
    trainer = _trainer(_NaNFromEpoch2(seed=7))
    history = trainer.run(5, progress=False)
    assert [r.epoch for r in history] == [0, 1, 2]  # nothing after the diverged epoch
    assert math.isnan(history[2].train_loss) and all(math.isfinite(r.val_loss) for r in history[:2])
    d = trainer.divergence
    assert (d.epoch, d.loss) == (2, "train") and math.isnan(d.value)
    assert d.last_finite_loss == history[1].train_loss
    assert trainer.stopped and trainer.run(5, progress=False) == []
    # its best checkpoint (epoch 0 or 1) is never handed out as a trained member
    assert trainer.best_epoch in (0, 1)
    with pytest.raises(DivergedError, match="diverged at epoch 2"):
        trainer.best_weights()
    # the state a node keeps between rounds carries the divergence
    again = _trainer(Plain())
    again.load_state_dict(trainer.state_dict())
    assert again.divergence.describe() == d.describe() and again.stopped and again.run(5, progress=False) == []


def test_a_member_diverged_in_its_first_epoch_never_ships_its_initialisation():
    trainer = _trainer(_NaNFromEpoch2(seed=7))
    trainer.strategy.begin_epoch = lambda *a, **k: setattr(trainer.strategy, "poisoned", True) or {}
    trainer.run(5, progress=False)
    assert trainer.divergence.epoch == 0 and trainer.divergence.last_finite_loss is None
    assert trainer.best_epoch == -1
    with pytest.raises(DivergedError):
        trainer.best_weights()
    xt, yt, xv, yv = _tiny()
    first_epoch = r"^surrogate diverged at epoch 0 \(train loss nan; last finite loss none\)"
    with pytest.raises(DivergedError, match=first_epoch):
        train_member(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)), xt, yt, xv, yv,
                     _NaNFromEpoch2(seed=3), TrainSettings(lr=float("inf"), epochs=2, batch_size=8), seed=3,
                     progress=False, desc="surrogate")


def test_a_nan_validation_loss_diverges_and_the_last_finite_loss_survives_a_resume():
    # two epochs in one round, then the validation loss turns NaN in the next round's first epoch
    first = _trainer(Plain())
    done = first.run(2, progress=False)
    second = _trainer(Plain())
    second.load_state_dict(first.state_dict())
    assert second.last_finite_loss == done[1].train_loss
    second._validate = lambda: (math.nan, 0.5)
    (rec,) = second.run(3, progress=False)
    d = second.divergence
    assert (d.epoch, d.loss) == (2, "validation") and math.isnan(d.value) and math.isnan(rec.val_loss)
    assert d.last_finite_loss == rec.train_loss  # that epoch's training loss was still finite


@pytest.fixture
def nan_member_2(monkeypatch):
    monkeypatch.setitem(strategies.STRATEGIES, "plain", _NaNFromEpoch2)


@pytest.fixture(autouse=True)
def own_log_handlers(monkeypatch):
    """The CLI adds handlers to the fedrobust logger: bound to this test's streams, and gone after it."""
    logger = logging.getLogger("fedrobust")
    monkeypatch.setattr(logger, "handlers", [])
    yield
    for handler in logger.handlers:
        handler.close()


# ------------------------------------------------ the wire, without Ray --
@pytest.fixture
def task_identity(monkeypatch):
    """What a real ServerApp process has set before main() runs."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


class _LoopbackGrid:
    """A Grid that runs the real ClientApp on each message in this process, keeping every reply's keys."""

    def __init__(self, n):
        from flwr.app import Context, RecordDict

        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i,
                                          "num-partitions": n}, state=RecordDict(), run_config={}) for i in range(n)}
        self.replies, self.keys = {}, []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        from clients.client_app import app

        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"task-{len(self.keys)}-{i}"
            ids.append(msg.metadata.message_id)
            reply = app(msg, self.contexts[msg.metadata.dst_node_id])
            self.keys.append(sorted(reply.content.keys()))
            self.replies[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]


def test_a_diverged_member_crosses_the_wire_without_weights_and_never_joins(nan_member_2, task_identity):
    from fedrobust.config import load_config
    from fedrobust.federation import collect_members
    from fedrobust.rounds import FlowerRounds

    # epoch 2 is in round 3 of 4: the last finite loss comes through the Flower Context, and in round 4
    # node 2 reports the diverged member again, which the server skips
    fast = ["train.progress=false", "train.epochs=4", "train.rounds=4", "train.batch_size=64"]
    cfg = load_config([*fast, "engine.on_missing=min_members"])
    grid, missing = _LoopbackGrid(3), {}
    members = collect_members(cfg, FlowerRounds(grid, cfg, node_wait_s=1), missing)
    assert [m.member for m in members] == [0, 1] and all(m.weights is not None for m in members)
    assert missing["members"] == [2] and missing["diverged"][0]["epoch"] == 2
    assert isinstance(missing["diverged"][0]["last_finite_loss"], float)
    node_2 = [k for k in grid.keys if "metrics.2" in k]
    assert len(node_2) == 4 and all("weights.2" in k for k in node_2[:2])
    assert all("diverged.2" in k and "weights.2" not in k and "current.2" not in k for k in node_2[2:])

    cfg = load_config(fast[:1] + ["train.epochs=3", "train.batch_size=64"])
    with pytest.raises(DivergedError, match=r"^member 2 \(node 2\) diverged at epoch 2 \(train loss nan; last finite"):
        collect_members(cfg, FlowerRounds(_LoopbackGrid(3), cfg, node_wait_s=1))


def test_a_reply_that_says_diverged_hands_over_no_weights():
    from fedrobust.protocol import decode_reply, encode_reply
    from fedrobust.node import MemberUpdate
    from fedrobust.training import Divergence
    from flwr.app import ArrayRecord

    u = MemberUpdate(node=1, member=1, weights=None, num_train_samples=10, num_val_samples=2, class_counts=[5, 5],
                     best_epoch=0, best_val_loss=0.5, epochs_trained=2, stopped=True,
                     divergence=Divergence(1, "train", math.inf, 0.7))
    rd = encode_reply([u])
    rd["weights.1"] = ArrayRecord({"w": torch.zeros(2)})  # whatever else a node sends
    (got,) = decode_reply(rd, "flower node 101")
    assert got.weights is None and got.current is None
    assert got.divergence == Divergence(1, "train", math.inf, 0.7)


# ---------------------------------------------------------- whole runs: CLI --

def test_a_diverged_member_fails_an_inline_run_in_one_line_naming_it(nan_member_2, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "engine=inline", *FAST, f"run_dir={run}"]) == 1
    err = capsys.readouterr().err
    (line,) = _errors(err)
    assert re.fullmatch(r"fedrobust: error: member 2 \(node 2\) diverged at epoch 2 \(train loss nan; last finite "
                        r"loss \d+\.?\d*(e-?\d+)?\); lower optimizer.lr, or set engine.on_missing=min_members to "
                        r"finish without it", line), line
    assert "Traceback" not in err
    assert (run / "INCOMPLETE").is_file() and not (run / "results.json").exists()
    assert not list((run / "members").iterdir())
    assert_strict_json(run)


def test_with_min_members_an_inline_run_finishes_without_the_diverged_member(nan_member_2, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "engine=inline", *FAST, "engine.on_missing=min_members", f"run_dir={run}"]) == 0
    err = capsys.readouterr().err
    assert _errors(err) == [] and "Traceback" not in err
    assert assert_strict_json(run) >= 1
    results = json.loads((run / "results.json").read_text())
    assert [m["member"] for m in results["members"]] == [0, 1]
    assert all(m["best_epoch"] >= 0 for m in results["members"])
    assert results["ensemble"]["num_members"] == 2
    missing = results["missing"]
    assert missing["members"] == [2] and "nodes" not in missing
    (d,) = missing["diverged"]
    assert {k: d[k] for k in ("member", "node", "epoch", "loss", "value")} == {
        "member": 2, "node": 2, "epoch": 2, "loss": "train", "value": "nan"}
    assert isinstance(d["last_finite_loss"], float) and d["last_finite_loss"] > 0
    assert "member 2 (node 2) diverged at epoch 2" in results["warnings"][0]
    assert sorted(p.name for p in (run / "members").iterdir()) == ["member_0.pt", "member_1.pt"]


def test_min_members_still_fails_when_too_few_members_are_left(nan_member_2, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "engine=inline", *FAST, "engine.on_missing=min_members", "engine.min_members=3",
                 f"run_dir={run}"]) == 1
    (line,) = _errors(capsys.readouterr().err)
    assert "member 2 (node 2) diverged at epoch 2" in line and "2 member(s) left, engine.min_members=3" in line


@pytest.mark.slow
def test_with_min_members_a_simulation_finishes_without_a_member_that_diverged_in_round_2(tmp_path, monkeypatch):
    # The ClientApps run in Ray's processes: node 2's task for round 2 (its epoch 2) asks for a learning
    # rate of 1e30.
    # Its trainer state (and last finite loss) comes from the Flower Context of round 1.
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedrobust.config import load_config
    from fedrobust.engines import launch_order

    original = raybackend.RayBackend.process_message
    overrides = [*FAST, "train.rounds=2", "engine.on_missing=min_members"]
    node_2 = launch_order(load_config(overrides)).index(2)  # the virtual SuperNode that trains node 2

    def infinite_lr_for_node_2(self, message, context):
        task = message.content["task"]
        if int(context.node_config["partition-id"]) == node_2 and int(task["round"]) == 1:
            message.content["task.train"]["lr"] = 1e30  # finite, so the task passes validation; the first step blows up
        return original(self, message, context)

    monkeypatch.setattr(raybackend.RayBackend, "process_message", infinite_lr_for_node_2)
    from in_process import simulate_here  # where the patch reaches the simulation

    run = simulate_here(overrides, tmp_path / "run")
    assert_strict_json(run)
    results = json.loads((run / "results.json").read_text())
    assert [m["member"] for m in results["members"]] == [0, 1]
    (d,) = results["missing"]["diverged"]
    assert (d["member"], d["node"], d["epoch"], d["loss"]) == (2, 2, 2, "train")
    assert isinstance(d["last_finite_loss"], float)
    assert results["missing"]["members"] == [2] and results["missing"]["flower_node_ids"] == []
