"""Members are validated before they join; the ensemble averages logits in eval mode."""

import contextlib
import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, Context, Error, Message, RecordDict

from clients.client_app import app as client_app
from fedrobust.config import load_config
from fedrobust.data import load_dataset
from fedrobust.ensemble import InvalidUpdateError, LogitAverageEnsemble, validate_member_weights
from fedrobust.federation import collect_members
from fedrobust.node import build_member, train_node_round
from fedrobust.protocol import decode_reply, encode_reply
from fedrobust.rounds import FlowerRounds

CFG = load_config(["train.progress=false", "train.epochs=1"])
REFERENCE = build_member(CFG, load_dataset("digits")).state_dict()


def _good():
    return {k: v.clone() for k, v in REFERENCE.items()}


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda w: w.__setitem__("1.classifier.weight", torch.zeros(3, 3)), "shape"),
        (lambda w: w["1.classifier.weight"].__setitem__((0, 0), float("nan")), "non-finite"),
        (lambda w: w["1.classifier.bias"].__setitem__(0, float("inf")), "non-finite"),
        (lambda w: w.__setitem__("1.classifier.bias", w["1.classifier.bias"].double()), "dtype"),
        (lambda w: w.pop("1.classifier.bias"), "missing"),
        (lambda w: w.__setitem__("backdoor", torch.zeros(1)), "unexpected"),
    ],
)
def test_bad_arrays_are_rejected_naming_the_node(mutate, match):
    w = _good()
    mutate(w)
    with pytest.raises(InvalidUpdateError, match=rf"^node 7: .*{match}"):
        validate_member_weights(w, REFERENCE, "node 7")


def test_valid_arrays_pass_as_copies():
    w = {k: v.numpy() for k, v in _good().items()}
    out = validate_member_weights(w, REFERENCE, "node 0")
    assert all(torch.equal(out[k], REFERENCE[k]) for k in REFERENCE)


def _fake_round(poison_node, how):
    def train_round(r, current):
        updates = []
        for node in range(3):
            (u,) = train_node_round(CFG, node, r, {})
            if node == poison_node:
                how(u.weights)
            # through the wire format, as the ServerApp sees it
            updates += decode_reply(encode_reply([u]), f"flower node {100 + node}")
        return updates

    return train_round


@pytest.mark.parametrize("how,match", [
    (lambda w: w.__setitem__("1.classifier.weight", torch.full_like(w["1.classifier.weight"], float("nan"))), "non-finite"),
    (lambda w: w.__setitem__("1.classifier.weight", torch.zeros(5, 128)), "shape"),
])
def test_poisoned_reply_never_enters_the_ensemble(how, match):
    with pytest.raises(InvalidUpdateError, match=rf"node 2: .*{match}"):
        collect_members(CFG, _fake_round(2, how))


def test_member_claimed_by_the_wrong_node_is_rejected():
    def train_round(r, current):
        (u,) = train_node_round(CFG, 0, r, {})
        u.node = 1  # node 1 pretends to deliver node 0's member
        return [u]

    with pytest.raises(InvalidUpdateError, match="node 1: .*does not belong"):
        collect_members(CFG, train_round)


@pytest.fixture
def task_identity(monkeypatch):
    """What a real ServerApp process has set before main() runs."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


class _LoopbackGrid:
    """A Grid that hands each message to the real ClientApp in this process, optionally poisoning replies."""

    def __init__(self, n, poison=None, lose=None, app=None):
        self.lose = lose  # this partition's client "dies": its reply is an error, as Flower's engine sends then
        self.contexts = {
            100 + i: Context(run_id=1, node_id=100 + i, node_config={"partition-id": i, "num-partitions": n},
                             state=RecordDict(), run_config={})
            for i in range(n)
        }
        self.poison = poison
        self.app = app or client_app
        self.replies = {}  # message id -> the reply waiting to be pulled

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Run the ClientApp on each message now; its reply waits for pull_messages, as Flower's do."""
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"task-{len(self.replies)}-{i}"  # as a Grid sets it on push
            ids.append(msg.metadata.message_id)
            self.replies[msg.metadata.message_id] = self._reply(msg)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]

    def _reply(self, msg):
        nid = msg.metadata.dst_node_id
        if self.contexts[nid].node_config["partition-id"] == self.lose:
            # as the SuperLink reports a node that stopped sending heartbeats: the error comes from the SuperLink
            reply = Message(Error(code=0, reason="<class 'ActorDiedError'>: the actor died"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = 1
            return reply
        reply = self.app(msg, self.contexts[nid])
        if self.poison is not None and self.contexts[nid].node_config["partition-id"] == self.poison:
            rec = reply.content["weights.%d" % self.poison]
            arr = rec["1.classifier.bias"].numpy().copy()
            arr[:] = np.nan
            rec["1.classifier.bias"] = Array(arr)
        return reply


def test_the_simulation_starts_the_largest_shard_first_and_trains_the_same_members(task_identity):
    """The simulation engine's ClientApp maps the k-th virtual SuperNode to the k-th node of the launch order
    (largest training shard first); the server learns the mapping from the replies, and each node's members
    are the ones it trains in index order, bit for bit."""
    from clients.client_app import make_app
    from fedrobust.engines import launch_order
    from fedrobust.node import dataset_of_task, shards_for
    from fedrobust.task import node_task

    task = node_task(CFG)
    sizes = [len(s.train) for s in shards_for(task, dataset_of_task(task))]
    order = launch_order(CFG)
    assert sorted(order) == [0, 1, 2] and order != [0, 1, 2], "the shards are in size order already: nothing tested"
    assert [sizes[n] for n in order] == sorted(sizes, reverse=True)
    grid = _LoopbackGrid(3, app=make_app(order))
    ordered = collect_members(CFG, FlowerRounds(grid, CFG, node_wait_s=1))
    plain = collect_members(CFG, FlowerRounds(_LoopbackGrid(3), CFG, node_wait_s=1))
    assert [m.node for m in ordered] == [m.node for m in plain] == [0, 1, 2]
    for a, b in zip(ordered, plain):
        assert a.weights.keys() == b.weights.keys()
        assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)
    with pytest.raises(ValueError, match="not an order of the 3 partition"):
        collect_members(CFG, FlowerRounds(_LoopbackGrid(3, app=make_app([0, 1])), CFG, node_wait_s=1))


def test_flower_messages_round_trip_through_the_client_app(task_identity):
    members = collect_members(CFG, FlowerRounds(_LoopbackGrid(3), CFG, node_wait_s=1))
    assert [m.node for m in members] == [0, 1, 2]
    inline = [train_node_round(CFG, n, 0, {})[0] for n in range(3)]
    for a, b in zip(members, inline):
        assert all(torch.equal(a.weights[k], b.weights[k]) for k in b.weights)


def test_flower_reply_with_nan_is_rejected_naming_the_node(task_identity):
    with pytest.raises(InvalidUpdateError, match=r"node 1: .*'1.classifier.bias'.*non-finite"):
        collect_members(CFG, FlowerRounds(_LoopbackGrid(3, poison=1), CFG, node_wait_s=1))


def test_a_lost_node_fails_the_round_naming_it_or_is_dropped_with_min_members(task_identity):
    # its reply is an error (its actor died): the node failed, in those words
    with pytest.raises(RuntimeError, match=r"^round 1: node\(s\) \[2\] failed \(.*ActorDiedError.*\); set engine.on_missing"):
        collect_members(CFG, FlowerRounds(_LoopbackGrid(3, lose=2), CFG, node_wait_s=1))
    cfg = load_config(["train.progress=false", "train.epochs=1", "engine.on_missing=min_members", "engine.min_members=2"])
    missing: dict = {}
    rounds = FlowerRounds(_LoopbackGrid(3, lose=2), cfg, node_wait_s=1)
    with _fedrobust_log() as lines:
        members = collect_members(cfg, rounds, missing)
    assert [m.node for m in members] == [0, 1] and missing["nodes"] == [2] and missing["members"] == [2]
    # the lost node is named by its own id (102), not the SuperLink's that sent the error (1)
    assert rounds.lost == [102] and rounds.node_ids == [100, 101]
    progress = [ln for ln in lines if ln.startswith("round 1: reply ")]  # one line per reply, as it arrives
    assert [ln.split(",")[0] for ln in progress] == [f"round 1: reply {i}/3" for i in (1, 2, 3)]
    assert sorted(ln.split("from flower node ")[1].split(",")[0] for ln in progress) == ["100", "101", "102"]
    assert [ln.endswith("(an error)") for ln in progress].count(True) == 1
    assert any(ln.startswith("flower node 102 failed in round 1: <class 'ActorDiedError'>") for ln in lines), lines
    assert "round 1: flower node(s) [102] failed; dropped from later rounds" in lines
    assert not any("no reply from flower node" in ln or "flower node 1 " in ln for ln in lines), lines


@contextlib.contextmanager
def _fedrobust_log():
    """The messages logged on the ``fedrobust`` logger (which may not propagate to pytest's capture)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("fedrobust")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_ensemble_averages_logits_and_stays_in_eval_mode():
    members = [torch.nn.Linear(4, 3) for _ in range(3)]
    ens = LogitAverageEnsemble(members)
    assert isinstance(ens.members, torch.nn.ModuleList)
    assert not ens.training and all(not m.training for m in ens.members)
    x = torch.rand(5, 4)
    expected = sum(m(x) for m in members) / 3
    assert torch.allclose(ens(x), expected, atol=1e-6)
    with pytest.raises(RuntimeError):
        ens.train()
    ens.eval()
    assert len(list(ens.parameters())) == 6  # .to() and attacks see every member


def test_a_client_without_its_data_says_so_in_one_line(task_identity, tmp_path):
    from flwr.app import Message, MessageType

    from fedrobust.config import load_config
    from fedrobust.data import DataError
    from fedrobust.protocol import encode_task

    cfg = load_config(["data=cifar10", "engine=inline"])
    ctx = Context(run_id=1, node_id=100, node_config={"partition-id": 0, "num-partitions": 3, "data-root": str(tmp_path)},
                  state=RecordDict(), run_config={})
    msg = Message(content=encode_task(cfg, 0, {}), dst_node_id=100, message_type=MessageType.TRAIN)
    with pytest.raises(DataError) as info:
        client_app(msg, ctx)
    text = str(info.value)
    assert text.startswith("node 0: cannot load data set 'cifar10': no CIFAR data under ") and "\n" not in text
