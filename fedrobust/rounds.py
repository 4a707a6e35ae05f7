"""The server's side of a federation over a Flower Grid: send every node its task, collect every member,
no averaging.

:class:`FlowerRounds` runs the rounds; :func:`serve` collects the members and
writes the run directory. ``fedrobust train engine=simulation`` builds its
ServerApp with :func:`make_server_app` around an already validated config; a
deployment's ServerApp (``flwr run .``) is :mod:`fedrobust.server_app`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from .errors import one_line
from .ensemble import InvalidUpdateError
from .federation import collect_members, peers_of
from .interrupt import hold
from .node import MemberUpdate
from .partition import num_nodes
from .protocol import decode_reply, encode_task
from .task import node_task

__all__ = ["FlowerRounds", "client_error", "make_server_app", "serve"]

log = logging.getLogger("fedrobust")


_RAISED = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.+?)\s*'?>?\s*$")


def client_error(reason: str) -> str:
    """A node's error reply in one line: the exception its ClientApp raised (``Type: message``, the last
    one its traceback names), else the whole reason with its whitespace collapsed."""
    raised = [m for m in map(_RAISED.match, reason.splitlines()) if m]
    if raised:
        return f"{raised[-1][1].rsplit('.', 1)[-1]}: {raised[-1][2]}"
    return one_line(reason)


class FlowerRounds:
    """``train_round`` over a Flower Grid: one TRAIN message per node per round."""

    def __init__(self, grid: Grid, cfg: DictConfig, node_wait_s: float = 60.0,
                 stop: threading.Event | None = None) -> None:
        self.grid = grid
        self.cfg = cfg
        self.stop = stop  # set when the engine under this ServerApp has died or was interrupted: stop waiting
        self.task = node_task(cfg)  # what every node is sent, with the round: never the config itself
        self.node_ids = self._wait_for_nodes(num_nodes(cfg.deployment.name, cfg.deployment.num_nodes), node_wait_s)
        self.partition_of: dict[int, int] = {}
        self.lost: list[int] = []  # Flower node ids that stopped replying (engine.on_missing=min_members)

    def _wait_for_nodes(self, expected: int, wait_s: float) -> list[int]:
        deadline = time.monotonic() + wait_s
        while True:
            ids = sorted(self.grid.get_node_ids())
            if len(ids) >= expected:
                if len(ids) > expected:
                    log.warning("%d nodes connected, the run uses %d; extra nodes get no task", len(ids), expected)
                return ids
            self._check_stop()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(ids)} of {expected} node(s) connected after {wait_s:.0f}s; start more SuperNodes, "
                    f"or in local simulation run `flwr run . --federation-config num-supernodes={expected}`"
                )
            time.sleep(1.0)

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise RuntimeError("the simulation runtime stopped; no more replies can come")

    def _send_and_receive(self, round_idx: int, messages: list[Message],
                          timeout: float | None) -> list[tuple[int, Message]]:
        """Push the round's messages, then pull replies until all are in, ``timeout`` has passed, or the
        engine has stopped. Each reply is logged as it arrives and returned with the Flower node it
        answers for: an error reply's source is the SuperLink, not the node."""
        ids = list(self.grid.push_messages(messages))
        node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
        waiting = set(node_of)
        start = time.monotonic()
        # Flower's own send_and_receive polls every 3 s; in a simulation the grid is in memory
        poll_s = 0.1 if self.stop is not None else 1.0
        replies: list[tuple[int, Message]] = []
        while waiting and (timeout is None or time.monotonic() - start < timeout):
            pulled = list(self.grid.pull_messages(waiting))
            self._check_stop()  # after the pull: replies that came after an interruption are not logged
            for reply in pulled:
                mid = reply.metadata.reply_to_message_id
                if mid not in waiting:
                    continue
                waiting.discard(mid)
                replies.append((node_of[mid], reply))
                log.info("round %d: reply %d/%d, from flower node %s, after %.1fs%s", round_idx + 1, len(replies),
                         len(messages), node_of[mid], time.monotonic() - start, " (an error)" if reply.has_error() else "")
                hold(f"reply-{round_idx + 1}-{len(replies)}")  # test hook: a moment between replies
            if waiting:
                time.sleep(poll_s)
        return replies

    def __call__(self, round_idx: int, current: dict[int, dict]) -> list[MemberUpdate]:
        # A Flower node knows its partition from its own node config; the server learns it from
        # the first reply. Until then a node also receives its own members' weights and ignores them.
        messages = []
        for nid in self.node_ids:
            part = self.partition_of.get(nid)
            peers = current if part is None else peers_of(self.cfg, part, current)
            messages.append(
                Message(content=encode_task(self.task, round_idx, peers), dst_node_id=nid, message_type=MessageType.TRAIN)
            )
        replies = self._send_and_receive(round_idx, messages, self.cfg.engine.timeout or None)
        updates: list[MemberUpdate] = []
        claimed: dict[int, int] = {}
        tolerate = self.cfg.engine.on_missing == "min_members"
        replied: set[int] = set()
        failed: dict[int, str] = {}  # Flower node id -> the reason in its error reply
        for nid, reply in replies:
            if reply.has_error():
                failed[nid] = client_error(str(reply.error.reason))
                log.warning("flower node %s failed in round %d: %s", nid, round_idx + 1, failed[nid])
                continue
            replied.add(nid)
            for u in decode_reply(reply.content, f"flower node {nid}"):
                if claimed.setdefault(u.node, nid) != nid:
                    raise InvalidUpdateError(f"node {u.node}: claimed by flower nodes {claimed[u.node]} and {nid}")
                self.partition_of[nid] = u.node
                updates.append(u)
        if failed and not tolerate:  # its ClientApp raised (or its actor died): failed, not silent
            without = sorted(set(range(num_nodes(self.cfg.deployment.name, self.cfg.deployment.num_nodes)))
                             - {u.node for u in updates})
            raise RuntimeError(f"round {round_idx + 1}: node(s) {without} failed ({next(iter(failed.values()))[:300]}); "
                               "set engine.on_missing=min_members to finish without them")
        silent = [nid for nid in self.node_ids if nid not in replied and nid not in failed]
        if tolerate and (failed or silent):  # collect_members decides whether the run can go on without them
            if failed:
                log.warning("round %d: flower node(s) %s failed; dropped from later rounds", round_idx + 1, sorted(failed))
            if silent:
                log.warning("round %d: no reply from flower node(s) %s within engine.timeout=%ss; dropped from later "
                            "rounds", round_idx + 1, silent, self.cfg.engine.timeout)
            self.lost += sorted(failed) + silent
            self.node_ids = [nid for nid in self.node_ids if nid in replied]
        return updates


def serve(grid: Grid, cfg: DictConfig, run_dir: Path, stop: threading.Event | None = None) -> None:
    """Collect the members over ``grid`` and write the run directory."""
    from .run import finalize_run

    rounds = FlowerRounds(grid, cfg, stop=stop)
    missing: dict = {}
    members = collect_members(cfg, rounds, missing)
    if missing:
        missing["flower_node_ids"] = rounds.lost
    finalize_run(cfg, run_dir, members, missing=missing or None)


def make_server_app(cfg: DictConfig, run_dir: Path, errors: list[BaseException],
                    stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp bound to ``cfg``; an exception is appended to ``errors`` for the caller.
    Setting ``stop`` makes it give up waiting for replies (the engine under it has died, or the
    command was interrupted), without logging any reply that comes after."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            serve(grid, cfg, run_dir, stop)
        except BaseException as exc:  # surfaced by the engine after the simulation stops
            errors.append(exc)

    return server
