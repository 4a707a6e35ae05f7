"""A run is a directory: config, members, log, TensorBoard events, results.json.

Layout::

    RUN_DIR/
      config.yaml          resolved configuration
      train.log            the log
      partition.csv        per-node class counts of the training shards
      members/member_M.pt  state dicts (load with torch.load(..., weights_only=True))
      tensorboard/         events: per-node train/val loss and accuracy, ensemble accuracy, class-mix image;
        hparams/           the run's HParams session (fedrobust.views)
      results.json         ensemble and per-member metrics
      INCOMPLETE           only while training runs, or after it was interrupted or failed

Files are written whole or not at all (:mod:`fedrobust.atomic`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, OneLineFailure
from .config import default_config
from .atomic import atomic_open, save_torch, write_json, write_text
from .data import ImageDataset, dataset_of
from .ensemble import Ensemble
from .interrupt import deferred
from .node import MemberUpdate, build_member
from .partition import class_counts_table
from .poisoning import backdoor_figures, malicious_record
from .redact import redact, redacted
from .runs.images import held_out_images
from .runs.members import INCOMPLETE
from .training import DivergedError, evaluate_model, resolve_device
from .views import add_figure, class_mix_figure, run_hparams, write_hparams

__all__ = ["INCOMPLETE", "check_output_dir", "check_run_dir", "finalize_run", "preflight", "prepare_run_dir", "settle_run_dir",
           "setup_logging"]

log = logging.getLogger("fedrobust")


def _default_run_dir() -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / stamp
    i = 1
    while path.exists():
        path = Path("runs") / f"{stamp}-{i}"
        i += 1
    return path


def check_run_dir(run_dir: str | None) -> Path:
    """The run directory to create; an existing non-empty one is refused, never overwritten.

    An interrupted or failed training leaves its directory marked ``INCOMPLETE``;
    training does not resume it (a new run_dir starts afresh; see docs/usage.md).
    """
    path = Path(run_dir).expanduser() if run_dir else _default_run_dir()
    if (path / INCOMPLETE).is_file():
        raise ConfigError(f"run_dir: {path} holds an interrupted or failed training run (marked {INCOMPLETE}); "
                          "training does not resume: delete it or choose another run_dir")
    check_output_dir(path, "run_dir")
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"run_dir: {path} already exists and is not empty; choose another path")
    return path


def check_output_dir(path: str | Path, key: str) -> Path:
    """Refuse a directory to write to that is a file, or whose nearest existing parent cannot be written."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a directory; choose another path")
    parent = next((p for p in [path, *path.absolute().parents] if p.exists()), Path("/"))
    if not parent.is_dir():
        raise ConfigError(f"{key}: {parent} is a file, so {path} cannot be created; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {parent} is not writable, so {path} cannot be created; choose another path")
    return path


def preflight(cfg: DictConfig) -> None:
    """Check the config against the data before anything is written: the archive loads, the shards exist."""
    from .data import DataError
    from .node import shards_for
    from .partition import PartitionError

    try:
        data = dataset_of(cfg)
    except DataError as exc:
        raise ConfigError(f"data: {exc}") from None
    try:
        shards_for(cfg, data)
    except PartitionError as exc:
        raise ConfigError(str(exc)) from None
    from .behaviours import check_malicious
    from .partition import num_nodes

    d = cfg.deployment
    try:  # the classes and image size a backdoor's target and trigger must fit
        check_malicious(OmegaConf.to_container(d.malicious, resolve=True), num_nodes(d.name, d.num_nodes),
                        data.num_classes, tuple(data.x_train.shape[-2:]))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the stream of the first call (a
    caller that swaps stderr, as pytest's capture does, would otherwise leave it writing to a closed file)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _RedactingFormatter(logging.Formatter):
    """Log lines with every URL password replaced by ``***`` (an error may quote a storage URL)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(run_dir: Path | None = None, filename: str = "train.log") -> None:
    logger = logging.getLogger("fedrobust")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = _RedactingFormatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in logger.handlers):
        sh = _StderrHandler()
        sh.setFormatter(fmt)
        logger.addHandler(sh)
    if run_dir is not None:
        for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(h)
            h.close()
        fh = logging.FileHandler(run_dir / filename)
        fh.setFormatter(fmt)
        logger.addHandler(fh)


def prepare_run_dir(cfg: DictConfig, run_dir: str | None) -> Path:
    """Create the run directory, write the resolved config, start the log."""
    path = check_run_dir(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        write_text(path / INCOMPLETE, "training has not finished (or was interrupted); finalize_run removes this file\n")
        (path / "members").mkdir(exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"run_dir: cannot create {path} ({exc.strerror or exc})") from None
    cfg.run_dir = str(path)
    write_text(path / "config.yaml", OmegaConf.to_yaml(redacted(cfg)))  # a storage URL's password: ***
    setup_logging(path)
    log.info("run directory: %s", path)
    return path


def settle_run_dir(run_dir: Path) -> None:
    """After the process that trained ``run_dir`` was killed: ``results.json`` is written last, so a run
    that has it is whole, and the INCOMPLETE a killed writer left beside it goes."""
    if (run_dir / "results.json").is_file():
        (run_dir / INCOMPLETE).unlink(missing_ok=True)


def _write_tensorboard(run_dir: Path, cfg: DictConfig, members: list[MemberUpdate], results: dict, table: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    per_node = len({u.member for u in members}) > len({u.node for u in members})
    with SummaryWriter(str(run_dir / "tensorboard")) as tb:
        for u in members:
            who = f"node{u.node}" + (f"_member{u.member}" if per_node else "")
            for r in u.history:
                tb.add_scalar(f"train_loss/{who}", r.train_loss, r.epoch)
                tb.add_scalar(f"train_acc/{who}", r.train_acc, r.epoch)
                tb.add_scalar(f"val_loss/{who}", r.val_loss, r.epoch)
                tb.add_scalar(f"val_acc/{who}", r.val_acc, r.epoch)
                tb.add_scalar(f"lr/{who}", r.lr, r.epoch)
                for term, value in r.terms.items():
                    tb.add_scalar(f"loss_terms/{who}/{term}", value, r.epoch)
        for m in results["members"]:
            tb.add_scalar(f"member_clean_accuracy/member{m['member']}", m["clean_accuracy"], 0)
        tb.add_scalar("ensemble/clean_accuracy", results["ensemble"]["clean_accuracy"], 0)
        for b in results.get("backdoor", []):  # simulated cheating nodes (fedrobust.poisoning)
            tb.add_scalar(f"backdoor/attack_success_rate_node{b['node']}", b["attack_success_rate"], 0)
        for v in results.get("screening", {}).get("members", []):
            tb.add_scalar(f"screening/accuracy_member{v['member']}", v["accuracy"], 0)
            tb.add_scalar(f"screening/logit_scale_member{v['member']}", v["logit_scale"], 0)
        tb.add_text("partition", "```\n" + table + "\n```", 0)
        tb.add_text("config", "```\n" + OmegaConf.to_yaml(redacted(cfg)) + "\n```", 0)
        add_figure(tb, "partition/class_counts", class_mix_figure({u.node: u.class_counts for u in members}))
    write_hparams(run_dir, run_hparams(redacted(cfg), default_config()), {"clean_accuracy": results["ensemble"]["clean_accuracy"]})


def _summary(results: dict) -> str:
    rows = [("member", "node", "train", "val", "best ep", "clean acc")]
    for m in results["members"]:
        rows.append((str(m["member"]), str(m["node"]), str(m["num_train_samples"]), str(m["num_val_samples"]),
                     str(m["best_epoch"]), f"{m['clean_accuracy']:.4f}"))
    e = results["ensemble"]
    rows.append(("ensemble", "-", "-", "-", "-", f"{e['clean_accuracy']:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(-1, lines[1])
    return "\n".join(lines)


class ScreeningError(OneLineFailure):
    """Screening rejected a member and ``engine.on_missing`` does not let the run finish without it."""


def _screen(cfg: DictConfig, data: ImageDataset, members: list[MemberUpdate], models: list, missing: dict) -> list:
    """With ``ensemble.screen``, each member's verdict on the server's images (:mod:`fedrobust.screening`); a
    rejected member is dropped as a lost one is (``engine.on_missing``), recorded in ``missing``."""
    if not cfg.ensemble.screen:
        return []
    from .screening import screen, server_images

    _, x, y = server_images(cfg, data)
    verdicts = screen(models, [u.member for u in members], [u.node for u in members], x, y,
                      cfg.ensemble.min_accuracy, cfg.ensemble.max_scale_mads)
    rejected = [v for v in verdicts if v.reason]
    for v in verdicts:
        log.info("screening member %d (node %d): accuracy %.4f, logit scale %.3g on the server's %d images%s",
                 v.member, v.node, v.accuracy, v.logit_scale, len(y), f": REJECTED, {v.reason}" if v.reason else "")
    if not rejected:
        return verdicts
    remaining = len(members) - len(rejected)
    what = "; ".join(f"member {v.member} (node {v.node}) rejected by screening: {v.reason}" for v in rejected)
    if cfg.engine.on_missing != "min_members":
        raise ScreeningError(f"{what}; set engine.on_missing=min_members to finish without it")
    if remaining < cfg.engine.min_members:
        raise ScreeningError(f"{what}; {remaining} member(s) left, engine.min_members={cfg.engine.min_members}")
    log.warning("%s; continuing with %d member(s) (engine.on_missing=min_members)", what, remaining)
    missing.setdefault("members", []).extend(v.member for v in rejected)
    missing.setdefault("rejected", []).extend({"member": v.member, "node": v.node, "reason": v.reason}
                                              for v in rejected)
    missing.setdefault("events", []).append(what)
    return verdicts


def finalize_run(cfg: DictConfig, run_dir: Path, members: list[MemberUpdate], *, data: ImageDataset | None = None,
                 missing: dict | None = None) -> dict:
    """Save members, assemble and score the ensemble, write results, TensorBoard and the summary."""
    t0 = time.perf_counter()
    diverged = [u.member for u in members if u.divergence is not None or u.weights is None]
    if diverged:  # collect_members leaves them out; an ensemble never holds one
        raise DivergedError(f"member(s) {diverged} diverged and cannot join the ensemble")
    data = data or dataset_of(cfg)
    device = resolve_device(cfg.train.device)
    counts = {u.node: u.class_counts for u in members}
    table = class_counts_table(counts, "training samples per class and node")
    log.info("\n%s", table)
    with atomic_open(run_dir / "partition.csv", "w") as f:
        f.write("node," + ",".join(f"class_{c}" for c in range(data.num_classes)) + ",total\n")
        for node, row in sorted(counts.items()):
            f.write(f"{node}," + ",".join(map(str, row)) + f",{sum(row)}\n")

    from .stats import interval_of

    # the test set, or the nodes' validation splits for a run scored for selection (attack.split=validation:
    # a study's trial, which never classifies a test image)
    images = held_out_images(cfg, data)
    x_held, y_held = images.tensors(data)
    malicious = malicious_record(cfg, data.num_classes)
    models = []
    for u in members:
        model = build_member(cfg, data)
        model.load_state_dict(u.weights)
        models.append(model.to(device).eval())
    missing = dict(missing or {})
    verdicts = _screen(cfg, data, members, models, missing)
    rejected = {v.member for v in verdicts if v.reason}
    member_rows = []
    kept_models, kept_ids = [], []
    cheats = {e["node"]: e["behaviour"] for e in (malicious or {}).get("nodes", [])}
    for u, model in zip(members, models):
        if u.member in rejected:  # kept for inspection, out of every ensemble
            (run_dir / "rejected").mkdir(exist_ok=True)
            save_torch(u.weights, run_dir / "rejected" / f"member_{u.member}.pt")
            continue
        save_torch(u.weights, run_dir / "members" / f"member_{u.member}.pt")
        _, acc = evaluate_model(model, x_held, y_held)
        kept_models.append(model)
        kept_ids.append(u.member)
        member_rows.append({
            "member": u.member,
            "node": u.node,
            "num_train_samples": u.num_train_samples,
            "num_val_samples": u.num_val_samples,
            "class_counts": u.class_counts,
            "clean_accuracy": acc,
            "clean_accuracy_interval": interval_of(acc, len(y_held)),  # 95% Wilson
            "best_epoch": u.best_epoch,
            "best_val_loss": u.best_val_loss,
            "epochs_trained": u.epochs_trained,
            "early_stopped": u.stopped,
            "trained_on": u.trained_on,
            **({"simulated_behaviour": cheats[u.node]} if u.node in cheats else {}),
        })
    models = kept_models
    e = cfg.ensemble
    try:
        ensemble = Ensemble(models, combine=e.combine, trim=e.trim).to(device)
    except ValueError as exc:  # a trim that leaves none of the members that screening or on_missing left
        raise ScreeningError(f"ensemble.trim={e.trim}: {exc}{' after screening' if rejected else ''}; lower "
                             f"ensemble.trim or raise engine.min_members to at least {2 * e.trim + 1}") from None
    _, ens_acc = evaluate_model(ensemble, x_held, y_held)
    results = {
        "ensemble": {"clean_accuracy": ens_acc, "clean_accuracy_interval": interval_of(ens_acc, len(y_held)),
                     "num_members": len(models), "num_test_samples": len(data.y_test)},
        "images": {"clean_accuracy": images.describe()},  # the images each figure was measured on
        "members": member_rows,
        "deployment": {"name": cfg.deployment.name, "num_nodes": cfg.deployment.num_nodes,
                       "alpha": cfg.deployment.alpha, "partition_seed": cfg.deployment.partition_seed},
        "data": cfg.data.name,
        "model": cfg.model.name,
        "strategy": cfg.strategy.name,
        # how the regulariser's weight gradient was computed (fd | exact); null for strategies without one
        "strategy_grad": cfg.strategy.get("grad"),
        "engine": cfg.engine.name,
        "seed": cfg.train.seed,
        # how the server combined and screened the members (fedrobust.ensemble, fedrobust.screening)
        "defence": {**OmegaConf.to_container(e, resolve=True), "server_images": cfg.deployment.server_images},
    }
    if verdicts:
        results["screening"] = {"server_images": cfg.deployment.server_images,
                                "members": [v.as_dict() for v in verdicts],
                                "rejected": [{"member": v.member, "node": v.node, "reason": v.reason}
                                             for v in verdicts if v.reason]}
    if malicious:
        results["malicious"] = malicious
        log.warning("%s: %s", malicious["note"], ", ".join(f"node {n['node']} ({n['behaviour']})"
                                                           for n in malicious["nodes"]))
        backdoors = backdoor_figures(cfg, data.num_classes, ensemble, models, kept_ids, x_held, y_held)
        if backdoors:
            results["backdoor"] = backdoors
            for b in backdoors:
                log.info("backdoor of node %d (target %d): attack success rate %.4f on %d triggered images",
                         b["node"], b["target"], b["attack_success_rate"], b["num_images"])
    if missing:
        results["missing"] = missing
        nodes = f" of node(s) {missing['nodes']}" if missing.get("nodes") else ""
        results["warnings"] = [f"the ensemble lacks member(s) {missing['members']}{nodes}: " + "; ".join(missing["events"])]
        log.warning("%s", results["warnings"][0])
    _write_tensorboard(run_dir, cfg, members, results, table)
    with deferred():  # results.json comes last, and the run is whole the moment it exists (see settle_run_dir)
        write_json(run_dir / "results.json", results)
        (run_dir / INCOMPLETE).unlink(missing_ok=True)
    log.info("ensemble of %d member(s): clean accuracy %.4f (finalised in %.1fs)", len(models), ens_acc, time.perf_counter() - t0)
    log.info("\n%s", _summary(results))
    return results
