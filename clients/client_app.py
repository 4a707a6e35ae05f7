"""Flower ClientApp (Message API): decode the task, train the node's members, reply.

The node learns which shard it holds from its node config: ``partition-id``
and ``num-partitions`` (set by the simulation engine, or by
``flower-supernode --node-config``), plus an optional ``data-root`` that
overrides the task's data folder. What to train comes as a
:class:`~fedrobust.task.NodeTask` (:mod:`fedrobust.protocol`), never as the
run's config; plug-in strategies installed on the node are loaded before it
is read. Trainer state (weights, momentum, RNG, early-stopping counters) is
kept in ``context.state`` between rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedrobust.behaviours import build_behaviour
from fedrobust.data import DataError
from fedrobust.node import dataset_of_task, train_node_round
from fedrobust.partition import num_nodes
from fedrobust.plugins import load_plugins
from fedrobust.protocol import decode_task, encode_reply

log = logging.getLogger("fedrobust")



def make_app(launch_order: Sequence[int] | None = None,
             malicious: Mapping[int, tuple[str, Mapping[str, Any]]] | None = None) -> ClientApp:
    """The ClientApp. With ``launch_order`` (the simulation engine's), the virtual SuperNode of partition id
    ``k`` trains node ``launch_order[k]``: Flower's simulation queues its SuperNodes' tasks by partition id, so
    the nodes it starts first are the ones the order puts first. A real SuperNode's partition id is its node.

    ``malicious`` (the simulation engine's, from ``deployment.malicious``: node -> behaviour and its options)
    makes those nodes cheat (:mod:`fedrobust.behaviours`); the module's ``app``, which real SuperNodes run,
    has none."""
    order = None if launch_order is None else [int(n) for n in launch_order]
    cheats = {int(n): (str(b), dict(o)) for n, (b, o) in (malicious or {}).items()}
    app = ClientApp()

    @app.train()
    def train_message(msg: Message, context: Context) -> Message:
        return train(msg, context, order, cheats)

    return app


def train(msg: Message, context: Context, launch_order: Sequence[int] | None = None,
          malicious: Mapping[int, tuple[str, Mapping[str, Any]]] | None = None) -> Message:
    # a node needs no attack stage: the evaluation code is never imported here
    load_plugins("strategies", "behaviours")
    task, round_idx, peers = decode_task(msg.content)
    node = int(context.node_config["partition-id"])
    partitions = int(context.node_config["num-partitions"])
    if launch_order is not None:
        if sorted(launch_order) != list(range(partitions)):
            raise ValueError(f"launch order {launch_order} is not an order of the {partitions} partition(s)")
        node = launch_order[node]
    expected = num_nodes(task.shard.deployment, task.shard.num_nodes)
    if partitions != expected:
        raise ValueError(f"node {node}: num-partitions={partitions} but the run expects {expected} node(s)")
    if "data-root" in context.node_config:
        task = task.with_data_root(str(context.node_config["data-root"]))
    try:
        dataset_of_task(task)
    except DataError as exc:  # one line in the SuperNode's log and in the server's error
        message = f"node {node}: cannot load data set '{task.shard.data}': {exc}"
        log.error(message)
        raise DataError(message) from None
    torch.set_num_threads(task.threads)

    state = {k[len("trainer.") :]: rec.to_torch_state_dict() for k, rec in context.state.array_records.items() if k.startswith("trainer.")}
    behaviour = None
    if malicious and node in malicious:  # a simulated cheat (fedrobust.behaviours)
        name, options = malicious[node]
        behaviour = build_behaviour(name, options, dataset_of_task(task).num_classes)
    updates = train_node_round(task, node, round_idx, state, peers=peers, behaviour=behaviour)
    for key, value in state.items():
        context.state[f"trainer.{key}"] = ArrayRecord(value)
    return Message(encode_reply(updates), reply_to=msg)


app = make_app()
