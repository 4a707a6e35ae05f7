"""The server's side of the protocol, independent of transport.

:func:`collect_members` runs the rounds through a ``train_round`` callable
(Flower messages or in-process calls), checks that every expected member
arrives exactly once from the node it belongs to, validates every member's
arrays against the model before anything else touches them, and returns the
final members with their full histories. A member that diverged never joins
them: it fails the run, or with ``engine.on_missing=min_members`` it is left
out and recorded in ``missing``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from omegaconf import DictConfig

from .data import dataset_of
from .ensemble import InvalidUpdateError, validate_member_weights
from strategies import build_strategy

from .node import MemberUpdate, build_member, epochs_per_round, initial_weights, members_of_node
from .partition import num_nodes
from .resume import TrainingStage
from .training import DivergedError

__all__ = ["collect_members", "peers_of", "TrainRound"]

log = logging.getLogger("fedrobust")

# (round index, current weights of every member known to the server) -> the members' updates,
# consumed as they come (an engine may yield them node by node)
TrainRound = Callable[[int, dict[int, dict]], Iterable[MemberUpdate]]


def peers_of(cfg: DictConfig, node: int, current: dict[int, dict]) -> dict[int, dict]:
    """The current weights a node receives: every member that does not live on it."""
    own = set(members_of_node(cfg, node))
    return {m: w for m, w in current.items() if m not in own}


def collect_members(cfg: DictConfig, train_round: TrainRound, missing: dict | None = None,
                    stage: TrainingStage | None = None) -> list[MemberUpdate]:
    """Run ``cfg.train.rounds`` rounds and return the validated members, ordered by index.

    With a ``stage`` (:mod:`fedrobust.resume`), only the rounds that overlap its epochs run: those
    ended by its start are skipped, the members' peers and histories start from the stage's, and the
    stage is left with the members' current weights and whole histories at its stop.

    Members that do not arrive in a round, or that diverged, fail the run
    (:class:`RuntimeError`; :class:`~fedrobust.training.DivergedError` for a
    divergence), unless ``engine.on_missing=min_members``: then they are
    dropped (with a warning, and recorded in ``missing`` for ``results.json``)
    as long as at least ``engine.min_members`` members remain. A node whose
    members did not arrive is dropped with them; a diverged member's node
    keeps its other members.
    """
    data = dataset_of(cfg)
    reference = build_member(cfg, data).state_dict()
    n_nodes = num_nodes(cfg.deployment.name, cfg.deployment.num_nodes)
    expected = {m: node for node in range(n_nodes) for m in members_of_node(cfg, node)}
    latest: dict[int, MemberUpdate] = {}
    diverged: dict[int, MemberUpdate] = {}
    needs_peers = build_strategy(cfg.strategy).needs_peers
    # Members as they are now; nodes receive their peers from here each round.
    current = initial_weights(cfg, data, sorted(expected)) if needs_peers and n_nodes > 1 else {}
    earlier: dict[int, list] = {}  # a resumed stage's histories, joined to the members' first updates
    if stage is not None and stage.start > 0:
        current = {m: w for m, w in stage.current.items() if m in current}
        earlier = dict(stage.history)
    bounds = _round_bounds(cfg)
    for r in range(cfg.train.rounds):
        if stage is not None and (bounds[r][1] <= stage.start or bounds[r][0] >= stage.stop):
            continue  # trained in an earlier stage, or left to a later one
        log.info("round %d/%d: training %d member(s) on %d node(s)", r + 1, cfg.train.rounds, len(expected), n_nodes)
        seen: set[int] = set()
        for u in train_round(r, current):
            who = f"node {u.node}"
            if u.member in diverged and diverged[u.member].node == u.node:
                if u.divergence is None:
                    raise InvalidUpdateError(
                        f"{who}: rejected update, member {u.member} stopped on a non-finite loss in an earlier round"
                    )
                continue  # a diverged member trains no more; its node reports it as it was
            if expected.get(u.member) != u.node:
                raise InvalidUpdateError(f"{who}: rejected update, member {u.member} does not belong to this node")
            if u.member in seen:
                raise InvalidUpdateError(f"{who}: rejected update, member {u.member} arrived twice in round {r + 1}")
            seen.add(u.member)
            if u.divergence is not None:
                u.weights = u.current = None
                if u.member in latest:
                    u.history = latest.pop(u.member).history + u.history
                else:
                    u.history = earlier.pop(u.member, []) + u.history
                _drop_diverged(cfg, u, len(expected) - 1, missing)
                diverged[u.member] = u
                expected.pop(u.member)
                current.pop(u.member, None)
                continue
            u.weights = validate_member_weights(u.weights, reference, who)
            if u.current is not None:
                u.current = validate_member_weights(u.current, reference, who)
                if current:
                    current[u.member] = u.current
            if u.member in latest:
                u.history = latest[u.member].history + u.history
            else:
                u.history = earlier.pop(u.member, []) + u.history
            latest[u.member] = u
        absent = sorted(set(expected) - seen)
        if absent:
            nodes = sorted({expected[m] for m in absent})
            what = f"round {r + 1}: no reply for member(s) {absent} from node(s) {nodes}"
            remaining = len(expected) - len(absent)
            if cfg.engine.on_missing != "min_members" or remaining < cfg.engine.min_members:
                raise RuntimeError(what + (f"; {remaining} member(s) left, engine.min_members={cfg.engine.min_members}"
                                           if cfg.engine.on_missing == "min_members" else
                                           "; set engine.on_missing=min_members to finish without them"))
            log.warning("%s; continuing with %d member(s) (engine.on_missing=min_members)", what, remaining)
            for m in absent:
                expected.pop(m)
                latest.pop(m, None)
                current.pop(m, None)
            if missing is not None:
                missing.setdefault("nodes", []).extend(nodes)
                missing.setdefault("members", []).extend(absent)
                missing.setdefault("events", []).append(what)
    members = [latest[m] for m in sorted(latest)]
    if stage is not None:
        stage.current = {u.member: u.current for u in members if u.current is not None}
        stage.history = {u.member: u.history for u in members}
    return members


def _round_bounds(cfg: DictConfig) -> list[tuple[int, int]]:
    """Each round's first epoch and the epoch after its last."""
    bounds, start = [], 0
    for n in epochs_per_round(cfg):
        bounds.append((start, start + n))
        start += n
    return bounds


def _drop_diverged(cfg: DictConfig, u: MemberUpdate, remaining: int, missing: dict | None) -> None:
    """Apply ``engine.on_missing`` to member ``u``, which diverged: raise, or record it in ``missing``."""
    what = f"member {u.member} (node {u.node}) {u.divergence.describe()}"
    if cfg.engine.on_missing != "min_members":
        raise DivergedError(f"{what}; lower optimizer.lr, or set engine.on_missing=min_members to finish without it")
    if remaining < cfg.engine.min_members:
        raise DivergedError(f"{what}; {remaining} member(s) left, engine.min_members={cfg.engine.min_members}")
    log.warning("%s; continuing with %d member(s) (engine.on_missing=min_members)", what, remaining)
    if missing is not None:
        missing.setdefault("members", []).append(u.member)
        missing.setdefault("diverged", []).append({"member": u.member, "node": u.node} | u.divergence.as_dict())
        missing.setdefault("events", []).append(what)
