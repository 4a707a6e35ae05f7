"""What a run shows in TensorBoard beyond its scalars: HParams, and figures as images.

* **HParams.** Each run is one HParams session, written to
  ``RUN_DIR/tensorboard/hparams``: its hyperparameters are the config keys that
  differ from the defaults, plus strategy, deployment and seed
  (:func:`run_hparams`); its metrics are the scalars ``hparams/clean_accuracy``
  (written by training) and ``hparams/RA_T``, ``hparams/RA_Q``,
  ``hparams/TSR`` (written by the evaluation). No experiment summary is
  written, so TensorBoard builds one from every run's session: ``tensorboard
  --logdir runs/`` compares runs with different overrides in one table, and
  only these metrics are its columns (the session directory holds no other
  scalars).
* **Images.** :class:`Board` writes the adversarial-example grid of an attack
  (clean image, adversarial image, amplified perturbation, the ensemble's
  prediction on each); :func:`class_mix_figure` is the per-node class mix of
  a partition as stacked bars.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["Board", "HPARAMS_DIR", "add_figure", "class_mix_figure", "run_hparams", "write_hparams"]

HPARAMS_DIR = "hparams"  # under RUN_DIR/tensorboard
# keys that say where or how visibly a run ran, not what it is
_NOT_HPARAMS = ("run_dir", "study_dir", "evaluate", "train.progress", "train.device", "attack.cache_dir", "data.root",
                "engine.ray_address", "tune.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: node}


def _hparam_value(v: Any) -> bool | int | float | str:
    return v if isinstance(v, (bool, int, float, str)) else str(v)


def run_hparams(cfg: DictConfig, defaults: DictConfig) -> dict[str, bool | int | float | str]:
    """Strategy, deployment and seed, and every config key whose value differs from ``defaults``."""
    ours = _flat(OmegaConf.to_container(cfg, resolve=True))
    base = _flat(OmegaConf.to_container(defaults, resolve=True))
    differ = {k: v for k, v in ours.items()
              if (k not in base or base[k] != v) and not any(k == n or k.startswith(n) for n in _NOT_HPARAMS)}
    always = {"strategy.name": cfg.strategy.name, "deployment.name": cfg.deployment.name, "train.seed": cfg.train.seed}
    for key in ("model.name", "model.genotype"):  # a genotype's JSON is a digest in the table (config.yaml has it)
        value = differ.get(key)
        if isinstance(value, str) and value.removeprefix("searched:").startswith("{"):
            body = value.removeprefix("searched:")
            differ[key] = value[: len(value) - len(body)] + "sha256:" + hashlib.sha256(body.encode()).hexdigest()[:12]
    return {k: _hparam_value(v) for k, v in sorted((always | differ).items())}


def _writer(logdir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(logdir))


def write_hparams(run_dir: Path, hparams: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
    """Start the run's HParams session with ``hparams`` and log its first metric values."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    _, start, end = hparams_summary(dict(hparams), {f"hparams/{k}": v for k, v in metrics.items()})
    with _writer(Path(run_dir) / "tensorboard" / HPARAMS_DIR) as w:
        w.file_writer.add_summary(start)  # no experiment summary: TensorBoard unions the sessions of all runs
        w.file_writer.add_summary(end)
        for k, v in metrics.items():
            w.add_scalar(f"hparams/{k}", v, 0)


def add_figure(writer, tag: str, fig, step: int = 0) -> None:
    """A Matplotlib figure as an image (closed afterwards)."""
    writer.add_figure(tag, fig, step, close=True)


def class_mix_figure(counts: Mapping[int, Sequence[int]], title: str = "training samples per class and node"):
    """Stacked bars: one bar per node, one colour per class."""
    plt = _pyplot()
    nodes = sorted(counts)
    num_classes = len(counts[nodes[0]]) if nodes else 0
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(nodes) + 2.5), 3.4))
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    bottom = [0] * len(nodes)
    for c in range(num_classes):
        heights = [counts[n][c] for n in nodes]
        ax.bar([str(n) for n in nodes], heights, bottom=bottom, color=cmap(c % cmap.N), label=str(c), width=0.8)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("node")
    ax.set_ylabel("training samples")
    ax.set_title(title, fontsize=9)
    if num_classes <= 20:
        ax.legend(title="class", fontsize=6, title_fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


def adversarial_figure(title: str, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, pred: torch.Tensor,
                       pred_adv: torch.Tensor):
    """Rows: clean (with the prediction), adversarial (with the prediction), perturbation amplified to [0, 1]."""
    plt = _pyplot()
    n = len(x)
    fig, axes = plt.subplots(3, n, figsize=(1.25 * n, 4.3), squeeze=False)
    delta = (x_adv - x).cpu()
    scale = float(delta.abs().max()) or 1.0
    rows = [(x.cpu(), "clean"), (x_adv.cpu(), "adversarial"), ((0.5 + delta / (2 * scale)), f"δ ×{0.5 / scale:.3g}")]
    for r, (images, label) in enumerate(rows):
        for i in range(n):
            ax = axes[r][i]
            img = images[i].permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r < 2:
                p = int((pred if r == 0 else pred_adv)[i])
                text = f"y {int(y[i])}, pred {p}" if r == 0 else f"pred {p}"
                ax.set_title(text, fontsize=7, color="tab:green" if p == int(y[i]) else "tab:red")
            if i == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


class Board:
    """A run's TensorBoard during an evaluation: scalars, histograms, images and HParams metrics.

    The writer opens on first use and closes with the ``with`` block, so an
    evaluation that writes nothing leaves no empty event file.
    """

    def __init__(self, run_dir: Path, num_images: int = 8) -> None:
        self.logdir = Path(run_dir) / "tensorboard"
        self.num_images = num_images
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            self._writer = _writer(self.logdir)
        return self._writer

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.close()

    @torch.no_grad()
    def adversarial_grid(self, attack: str, model, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> None:
        """The first ``num_images`` images of the sample under ``attack``, with the model's predictions."""
        k = min(self.num_images, len(x))
        x, x_adv, y = x[:k], x_adv[:k], y[:k]
        pred, pred_adv = model(x).argmax(1), model(x_adv).argmax(1)
        fig = adversarial_figure(f"{attack}: {int((pred_adv != y).sum())}/{k} fooled", x, x_adv, y, pred, pred_adv)
        add_figure(self.writer, f"adversarial_examples/{attack}", fig)
        self.writer.flush()  # on disk with its stage's part, even if the evaluation is killed later

    def hparam_metrics(self, metrics: Mapping[str, float]) -> None:
        """Metric values of the run's HParams session (see :func:`write_hparams`)."""
        with _writer(self.logdir / HPARAMS_DIR) as w:
            for k, v in metrics.items():
                w.add_scalar(f"hparams/{k}", v, 0)
