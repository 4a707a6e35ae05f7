"""``fedrobust search-arch OUT_DIR``: AdvRush (paper 003, Alg. 1) on a data set's training split.

The training images (never the test set) are split in two halves with
``split_seed``: one updates the supernet's weights w (momentum SGD), the
other its architecture parameters alpha (Adam). Each step updates w on a
batch of the first half, then alpha on a batch of the second (first-order
DARTS, as Alg. 1 writes it). For ``warmup`` epochs alpha follows the plain
validation loss; after that, ``L_val + gamma * L_lambda`` (eq. 10,
:mod:`.penalty`). ``gamma = 0`` is plain DARTS, the paper's baseline. At
the end, DARTS' rule turns alpha into a genotype.

Everything lives in ``OUT_DIR``:

* ``search.json``: the settings and a key of everything the result depends
  on; a rerun with other settings is refused.
* ``checkpoint.pt``: after each epoch, the supernet, both optimisers, the
  learning-rate schedule and the history. A rerun resumes from it; batch
  order is a function of (seed, epoch), so a resumed search is the
  uninterrupted one.
* ``history.csv``, ``search.png`` and ``tensorboard/``: per epoch the losses
  and accuracies of both halves, the penalty's mean over the alpha steps,
  the penalty and the supernet's lambda_max on a fixed probe of the alpha
  half, alpha's entropy per edge, and the genotype the rule would give.
* ``genotype.json`` (use it as ``model=searched:OUT_DIR/genotype.json``) and
  ``alpha.json`` (the final softmax weights, per cell type and edge).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..atomic import save_figure, save_torch, write_json
from ..errors import ConfigError
from ..data import ImageDataset, to_float
from ..runs.cache import content_key, tensor_fingerprint
from ..models import Normalize
from ..progress import progress
from ..searchdir import claim_folder
from ..training import resolve_device
from .ops import PRIMITIVES
from .penalty import smoothness_penalty
from .supernet import Supernet

__all__ = ["run_search"]

log = logging.getLogger("fedrobust")

_NOT_TRAJECTORY = ("device", "progress")


def split_halves(data: ImageDataset, images: int | None, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the training images of the w half and the alpha half: ``images`` in all (null: every
    training image), stratified by class, and each half stratified too (scikit-learn's stratified split)."""
    from sklearn.model_selection import train_test_split

    y = np.asarray(data.y_train)
    pool = np.arange(len(y))
    if images is not None and images < len(y):
        pool, _ = train_test_split(pool, train_size=images, stratify=y, random_state=split_seed)
    half = len(pool) // 2
    w_idx, a_idx = train_test_split(pool, train_size=half, test_size=half, stratify=y[pool], random_state=split_seed)
    return np.sort(w_idx), np.sort(a_idx)


def _generator(seed: int, *salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *salt]).generate_state(1)[0]))


class _Search:
    def __init__(self, out: Path, data: ImageDataset, s: DictConfig) -> None:
        self.out, self.data, self.s = Path(out), data, s
        self.device = resolve_device(s.device)
        w_idx, a_idx = split_halves(data, s.images, s.split_seed)
        if len(w_idx) < s.batch_size:
            raise ConfigError(f"arch_search.batch_size: {s.batch_size} is more than a half of the "
                              f"{2 * len(w_idx)} training images used")
        x = to_float(data.x_train)
        self.xw, self.yw = x[w_idx].to(self.device), data.y_train[w_idx].to(self.device)
        self.xa, self.ya = x[a_idx].to(self.device), data.y_train[a_idx].to(self.device)
        k = min(s.probe_images, len(a_idx))
        self.probe = self.xa[:k], self.ya[:k]
        settings = {k: v for k, v in OmegaConf.to_container(s).items() if k not in _NOT_TRAJECTORY}
        self.key = content_key({"settings": settings, "data": data.name,
                                "data_fp": tensor_fingerprint(data.x_train, data.y_train), "version": 1})
        self.description = {"key": self.key, "data": data.name, "image_size": data.image_size,
                            "w_images": len(w_idx), "alpha_images": len(a_idx), "settings": settings}

    def claim(self) -> bool:
        """Create the folder or check that it holds this search; True when a checkpoint is there to resume."""
        return claim_folder(self.out, self.description, "checkpoint.pt", kind="architecture search")


def _build(search: _Search) -> nn.Sequential:
    s, d = search.s, search.data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        net = Supernet(d.in_channels, d.num_classes, s.layers, s.channels, s.steps, s.stem_multiplier,
                       generator=_generator(s.seed, 1), stem_stride=s.stem_stride)
    return nn.Sequential(Normalize(d.mean, d.std), net).to(search.device)


def _probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: DictConfig) -> dict[str, float]:
    from ..attacks.smoothness import hessian_lambda_max

    model.eval()
    penalty = float(smoothness_penalty(model, x, y, s.h).detach())
    lam = hessian_lambda_max(model, x, y, s.power_iters, generator=_generator(s.seed, 2))
    model.train()
    return {"probe_penalty": penalty, "lambda_max": float(lam.mean())}


def _epoch(model: nn.Sequential, search: _Search, epoch: int, w_opt, a_opt, bar) -> dict[str, float]:
    s = search.s
    net: Supernet = model[1]
    w_params, a_params = net.weight_parameters(), net.arch_parameters()
    penalty_on = epoch >= s.warmup and s.gamma > 0
    pw = torch.randperm(len(search.yw), generator=_generator(s.seed, 3, epoch)).to(search.device)
    pa = torch.randperm(len(search.ya), generator=_generator(s.seed, 4, epoch)).to(search.device)
    steps = min(len(pw), len(pa)) // s.batch_size
    sums = {"train_loss": 0.0, "train_acc": 0.0, "val_loss": 0.0, "val_acc": 0.0, "penalty": 0.0}
    model.train()
    for b in range(steps):
        iw, ia = pw[b * s.batch_size:(b + 1) * s.batch_size], pa[b * s.batch_size:(b + 1) * s.batch_size]
        xw, yw, xa, ya = search.xw[iw], search.yw[iw], search.xa[ia], search.ya[ia]
        logits = model(xw)  # w: plain cross-entropy on the w half
        loss = F.cross_entropy(logits, yw)
        # backward(inputs=...): gradients for w only, accumulated into .grad as the optimiser expects
        w_opt.zero_grad(set_to_none=True)
        loss.backward(inputs=w_params)
        nn.utils.clip_grad_norm_(w_params, s.grad_clip)
        w_opt.step()
        sums["train_loss"] += float(loss.detach())
        sums["train_acc"] += float((logits.argmax(1) == yw).float().mean())
        logits = model(xa)  # alpha: cross-entropy on the alpha half, plus gamma * L_lambda after the warm-up
        val = F.cross_entropy(logits, ya)
        total = val
        if penalty_on:
            pen = smoothness_penalty(model, xa, ya, s.h)
            total = val + s.gamma * pen
            sums["penalty"] += float(pen.detach())
        a_opt.zero_grad(set_to_none=True)
        total.backward(inputs=a_params)  # an alpha no cell uses (2 cells: both reduce) keeps grad None: Adam skips it
        a_opt.step()
        sums["val_loss"] += float(val.detach())
        sums["val_acc"] += float((logits.argmax(1) == ya).float().mean())
        bar.update(1)
    out = {k: v / max(steps, 1) for k, v in sums.items()}
    if not penalty_on:
        out["penalty"] = math.nan
    if not all(math.isfinite(out[k]) for k in ("train_loss", "val_loss")):
        raise FloatingPointError(f"epoch {epoch + 1}: the supernet's loss is not finite "
                                 f"(train {out['train_loss']}, val {out['val_loss']}); lower arch_search.w_lr")
    return out


def _optimisers(model: nn.Sequential, s: DictConfig):
    net: Supernet = model[1]
    w_opt = torch.optim.SGD(net.weight_parameters(), lr=s.w_lr, momentum=s.w_momentum, weight_decay=s.w_weight_decay)
    a_opt = torch.optim.Adam(net.arch_parameters(), lr=s.alpha_lr, betas=tuple(s.alpha_betas),
                             weight_decay=s.alpha_weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(w_opt, T_max=s.epochs, eta_min=s.w_lr_min)
    return w_opt, a_opt, sched


def _write_history(out: Path, history: list[dict[str, Any]]) -> None:
    from ..atomic import atomic_open

    keys = list(history[0]) if history else []
    with atomic_open(out / "history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def _plot(out: Path, history: list[dict[str, Any]], s: DictConfig) -> None:
    from ..views import _pyplot

    plt = _pyplot()
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    axes[0].plot(ep, [h["train_loss"] for h in history], label="w half (train)")
    axes[0].plot(ep, [h["val_loss"] for h in history], label="alpha half (val)")
    axes[0].set_ylabel("cross-entropy")
    axes[1].plot(ep, [h["probe_penalty"] for h in history], "o-", ms=3, label="L_lambda (probe)")
    axes[1].plot(ep, [h["lambda_max"] for h in history], "s--", ms=3, label="lambda_max (probe)")
    axes[1].set_yscale("log")
    axes[2].plot(ep, [h["entropy_normal"] for h in history], label="normal cell")
    axes[2].plot(ep, [h["entropy_reduce"] for h in history], label="reduction cell")
    axes[2].axhline(math.log(len(PRIMITIVES)), color="grey", linestyle=":", label="uniform")
    axes[2].set_ylabel("alpha's mean entropy per edge (nats)")
    for ax in axes:
        if s.warmup < s.epochs and s.gamma > 0:
            ax.axvline(s.warmup + 0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle(f"{'AdvRush' if s.gamma > 0 else 'DARTS'} search (gamma {s.gamma:g}, warm-up {s.warmup} epochs)")
    fig.tight_layout()
    save_figure(fig, out / "search.png", dpi=110)
    plt.close(fig)


def _alpha_table(net: Supernet) -> dict[str, Any]:
    rows = {}
    for name, a in (("normal", net.alpha_normal), ("reduce", net.alpha_reduce)):
        p = torch.softmax(a.detach().cpu().double(), dim=-1)
        rows[name] = [{op: round(float(v), 5) for op, v in zip(PRIMITIVES, row)} for row in p]
    return {"primitives": list(PRIMITIVES), **rows}


def run_search(out: str | Path, data: ImageDataset, s: DictConfig, *, log_file: bool = False) -> dict[str, Any]:
    """Run (or resume) a search; returns the genotype's JSON dict (also in ``OUT/genotype.json``)."""
    from torch.utils.tensorboard import SummaryWriter

    search = _Search(Path(out), data, s)
    resume = search.claim()
    out = search.out
    if log_file:
        from ..run import setup_logging

        setup_logging(out, "search.log")
    model = _build(search)
    net: Supernet = model[1]
    w_opt, a_opt, sched = _optimisers(model, s)
    history: list[dict[str, Any]] = []
    start = 0
    if resume:
        state = torch.load(out / "checkpoint.pt", map_location=search.device, weights_only=True)
        model.load_state_dict(state["model"])
        w_opt.load_state_dict(state["w_opt"])
        a_opt.load_state_dict(state["a_opt"])
        sched.load_state_dict(state["sched"])
        history, start = list(state["history"]), int(state["epoch"])
        log.info("arch search: resuming %s after epoch %d of %d", out, start, s.epochs)
    else:
        log.info("arch search: %s on %s (%d + %d training images), gamma %g, %d epochs (%d warm-up), "
                 "supernet %d cells x %d channels, %d nodes", out, data.name, len(search.yw), len(search.ya),
                 s.gamma, s.epochs, s.warmup, s.layers, s.channels, s.steps)
    steps = min(len(search.yw), len(search.ya)) // s.batch_size
    with SummaryWriter(str(out / "tensorboard"), purge_step=start + 1) as tb:
        for epoch in range(start, s.epochs):
            t0 = time.perf_counter()
            phase = "penalty" if epoch >= s.warmup and s.gamma > 0 else "warm-up" if s.gamma > 0 else "darts"
            with progress(total=steps, desc=f"epoch {epoch + 1}/{s.epochs} ({phase})", enabled=s.progress,
                          leave=False) as bar:
                rec = _epoch(model, search, epoch, w_opt, a_opt, bar)
            sched.step()
            rec.update(_probe(model, *search.probe, s))
            ent = net.alpha_entropy()
            genotype = net.genotype(s.net_layers, s.net_channels)
            row = {"epoch": epoch + 1, **{k: round(v, 6) for k, v in rec.items()},
                   "entropy_normal": round(float(ent["normal"].mean()), 6),
                   "entropy_reduce": round(float(ent["reduce"].mean()), 6),
                   "lr": round(sched.get_last_lr()[0], 8), "seconds": round(time.perf_counter() - t0, 2),
                   "genotype": json.dumps({"normal": genotype.normal, "reduce": genotype.reduce})}
            history.append(row)
            for k in ("train_loss", "val_loss", "train_acc", "val_acc", "penalty", "probe_penalty", "lambda_max"):
                if math.isfinite(row[k]):
                    tb.add_scalar(f"search/{k}", row[k], epoch + 1)
            for cell, values in ent.items():
                for i, v in enumerate(values.tolist()):
                    tb.add_scalar(f"alpha_entropy/{cell}/edge_{i:02d}", v, epoch + 1)
            save_torch({"epoch": epoch + 1, "model": model.state_dict(), "w_opt": w_opt.state_dict(),
                        "a_opt": a_opt.state_dict(), "sched": sched.state_dict(), "history": history},
                       out / "checkpoint.pt")
            _write_history(out, history)
            log.info("arch search: epoch %d/%d (%s) train %.3f/%.3f val %.3f/%.3f L_lambda %.4g lambda_max %.4g "
                     "(%.0fs)", epoch + 1, s.epochs, phase, row["train_loss"], row["train_acc"], row["val_loss"],
                     row["val_acc"], row["probe_penalty"], row["lambda_max"], row["seconds"])
    genotype = net.genotype(s.net_layers, s.net_channels)
    notes = {"gamma": s.gamma, "h": s.h, "epochs": s.epochs, "warmup": s.warmup, "seed": s.seed,
             "data": data.name, "supernet": {"layers": s.layers, "channels": s.channels, "steps": s.steps},
             "seconds": round(sum(h["seconds"] for h in history), 1), "key": search.key}
    doc = genotype.to_dict(search=notes)
    write_json(out / "genotype.json", doc)
    write_json(out / "alpha.json", _alpha_table(net))
    if history:
        _plot(out, history, s)
    log.info("arch search: genotype in %s", out / "genotype.json")
    return doc
