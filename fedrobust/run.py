"""A run is a directory: config, members, log, TensorBoard events, results.json.

Layout::

    RUN_DIR/
      config.yaml          resolved configuration
      train.log            the log
      partition.csv        per-node class counts of the training shards
      members/member_M.pt  state dicts (load with torch.load(..., weights_only=True))
      tensorboard/         events: per-node train/val loss and accuracy, ensemble accuracy
      results.json         ensemble and per-member metrics
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError
from .data import ImageDataset, load_dataset
from .ensemble import LogitAverageEnsemble
from .node import MemberUpdate, build_member
from .partition import class_counts_table
from .training import evaluate_model, resolve_device

__all__ = ["finalize_run", "load_ensemble", "prepare_run_dir", "setup_logging"]

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
    """The run directory to create; an existing non-empty one is refused, never overwritten."""
    path = Path(run_dir).expanduser() if run_dir else _default_run_dir()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"run_dir: {path} already exists and is not empty; choose another path")
    return path


def preflight(cfg: DictConfig) -> None:
    """Check the config against the data before anything is written: the archive loads, the shards exist."""
    from .data import DataError
    from .node import shards_for
    from .partition import PartitionError

    try:
        data = load_dataset(cfg.data.name, cfg.data.root)
    except DataError as exc:
        raise ConfigError(f"data: {exc}") from None
    try:
        shards_for(cfg, data)
    except PartitionError as exc:
        raise ConfigError(str(exc)) from None


def setup_logging(run_dir: Path | None = None, filename: str = "train.log") -> None:
    logger = logging.getLogger("fedrobust")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in logger.handlers):
        sh = logging.StreamHandler()
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
    path.mkdir(parents=True, exist_ok=True)
    (path / "members").mkdir(exist_ok=True)
    cfg.run_dir = str(path)
    (path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    setup_logging(path)
    log.info("run directory: %s", path)
    return path


def load_ensemble(
    run_dir: str | Path, device: torch.device | str = "cpu", cfg: DictConfig | None = None
) -> LogitAverageEnsemble:
    """Rebuild a run's ensemble from its member checkpoints (and its config, unless ``cfg`` is given)."""
    run_dir = Path(run_dir)
    cfg = cfg if cfg is not None else OmegaConf.load(run_dir / "config.yaml")
    data = load_dataset(cfg.data.name, cfg.data.root)
    members = []
    for path in sorted((run_dir / "members").glob("member_*.pt"), key=lambda p: int(p.stem.split("_")[1])):
        model = build_member(cfg, data)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        members.append(model)
    return LogitAverageEnsemble(members).to(device)


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
        tb.add_text("partition", "```\n" + table + "\n```", 0)
        tb.add_text("config", "```\n" + OmegaConf.to_yaml(cfg) + "\n```", 0)


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


def finalize_run(cfg: DictConfig, run_dir: Path, members: list[MemberUpdate], *, data: ImageDataset | None = None,
                 missing: dict | None = None) -> dict:
    """Save members, assemble and score the ensemble, write results, TensorBoard and the summary."""
    t0 = time.perf_counter()
    data = data or load_dataset(cfg.data.name, cfg.data.root)
    device = resolve_device(cfg.train.device)
    counts = {u.node: u.class_counts for u in members}
    table = class_counts_table(counts, "training samples per class and node")
    log.info("\n%s", table)
    with open(run_dir / "partition.csv", "w") as f:
        f.write("node," + ",".join(f"class_{c}" for c in range(data.num_classes)) + ",total\n")
        for node, row in sorted(counts.items()):
            f.write(f"{node}," + ",".join(map(str, row)) + f",{sum(row)}\n")

    models = []
    member_rows = []
    for u in members:
        torch.save(u.weights, run_dir / "members" / f"member_{u.member}.pt")
        model = build_member(cfg, data)
        model.load_state_dict(u.weights)
        model.to(device).eval()
        _, acc = evaluate_model(model, data.x_test, data.y_test)
        models.append(model)
        member_rows.append({
            "member": u.member,
            "node": u.node,
            "num_train_samples": u.num_train_samples,
            "num_val_samples": u.num_val_samples,
            "class_counts": u.class_counts,
            "clean_accuracy": acc,
            "best_epoch": u.best_epoch,
            "best_val_loss": u.best_val_loss,
            "epochs_trained": u.epochs_trained,
            "early_stopped": u.stopped,
            "trained_on": u.trained_on,
        })
    ensemble = LogitAverageEnsemble(models).to(device)
    _, ens_acc = evaluate_model(ensemble, data.x_test, data.y_test)
    results = {
        "ensemble": {"clean_accuracy": ens_acc, "num_members": len(models), "num_test_samples": len(data.y_test)},
        "members": member_rows,
        "deployment": {"name": cfg.deployment.name, "num_nodes": cfg.deployment.num_nodes,
                       "alpha": cfg.deployment.alpha, "partition_seed": cfg.deployment.partition_seed},
        "data": cfg.data.name,
        "model": cfg.model.name,
        "strategy": cfg.strategy.name,
        "engine": cfg.engine.name,
        "seed": cfg.train.seed,
    }
    if missing:
        results["missing"] = missing
        results["warnings"] = [f"the ensemble lacks member(s) {missing['members']} of node(s) {missing['nodes']}: "
                               + "; ".join(missing["events"])]
        log.warning("%s", results["warnings"][0])
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    _write_tensorboard(run_dir, cfg, members, results, table)
    log.info("ensemble of %d member(s): clean accuracy %.4f (finalised in %.1fs)", len(models), ens_acc, time.perf_counter() - t0)
    log.info("\n%s", _summary(results))
    return results
