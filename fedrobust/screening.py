"""The server's screening of members, on images of its own, before they join the ensemble.

With ``ensemble.screen=true`` the server scores every member that passed the
format checks (:func:`fedrobust.ensemble.validate_member_weights`) on its
``deployment.server_images`` training images, which no node ever holds
(:func:`fedrobust.partition.server_indices`; never a test image). It
rejects a member

* whose accuracy there is below ``ensemble.min_accuracy`` times the median
  member's (a free rider, a node that trained on flipped labels), or
* whose logit scale is an outlier: the scale is the median over the images
  of the standard deviation of the member's logits across classes; a member
  is rejected when ``|log scale - median log scale|`` exceeds
  ``ensemble.max_scale_mads`` times the scaled median absolute deviation
  (1.4826 MAD) of the members' log scales, floored at ``log(2) / 5``, so
  that a member is never rejected for a scale within 2x of the median's at
  the default 5 (a member that multiplies its logits by 100).

A member whose logits there are not finite (weights that pass the format
checks can still divide by zero) is rejected too, and left out of the
medians. A rejected member is dropped as a lost one is: ``engine.on_missing=fail``
fails the run naming it, ``min_members`` finishes without it. The rules
are written here: they read a member's outputs on the server's images,
which parameter-level defences (Flower's FedMedian, Krum, Bulyan) do not
see. A backdoor keeps a member's clean accuracy and scale: screening does
not find it (``results.json``'s ``backdoor`` figures say what it did).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from .data import ImageDataset, to_float
from .partition import server_indices

__all__ = ["MAD_FLOOR", "Verdict", "screen", "server_images"]

MAD_FLOOR = math.log(2.0) / 5.0  # of the scaled MAD of log scales: no rejection within 2x at max_scale_mads=5


@dataclass
class Verdict:
    """One member's screening: its figures on the server's images, and why it was rejected (None: kept)."""

    member: int
    node: int
    accuracy: float
    logit_scale: float
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"member": self.member, "node": self.node, "accuracy": self.accuracy, "logit_scale": self.logit_scale,
                "kept": self.reason is None, "reason": self.reason}


def server_images(cfg: DictConfig, data: ImageDataset) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """The server's own images: their indices into the training split, the images and their labels."""
    idx = server_indices(len(data.y_train), int(cfg.deployment.server_images), int(cfg.deployment.partition_seed))
    return idx, data.x_train[idx], data.y_train[idx]


@torch.no_grad()
def _figures(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> tuple[float, float]:
    """A member's accuracy on (x, y) and its logit scale (median over images of the logits' std across classes)."""
    device = next(model.parameters()).device
    correct, spread = 0, []
    for i in range(0, len(y), batch):
        z = model(to_float(x[i:i + batch]).to(device)).float()
        correct += int((z.argmax(1).cpu() == y[i:i + batch]).sum())
        spread.append(z.std(1).cpu())
    return correct / max(1, len(y)), float(torch.cat(spread).median())


def screen(models: list[nn.Module], members: list[int], nodes: list[int], x: torch.Tensor, y: torch.Tensor,
           min_accuracy: float, max_scale_mads: float) -> list[Verdict]:
    """Each member's :class:`Verdict` on the server's images ``x``, ``y`` (see the module docstring)."""
    verdicts = []
    for model, m, n in zip(models, members, nodes):
        acc, scale = _figures(model, x, y)
        verdicts.append(Verdict(m, n, acc, scale))
    finite = [v for v in verdicts if math.isfinite(v.logit_scale)] or verdicts
    accs = np.array([v.accuracy for v in finite])
    logs = np.log(np.maximum([v.logit_scale if math.isfinite(v.logit_scale) else 1.0 for v in verdicts], 1e-12))
    floor = min_accuracy * float(np.median(accs))
    kept_logs = np.log(np.maximum([v.logit_scale for v in finite], 1e-12))
    centre = float(np.median(kept_logs))
    spread = max(1.4826 * float(np.median(np.abs(kept_logs - centre))), MAD_FLOOR)
    for v, log_scale in zip(verdicts, logs):
        ratio = math.exp(log_scale - centre)
        if not math.isfinite(v.logit_scale):
            v.reason = f"non-finite logits on the server's {len(y)} images"
        elif v.accuracy < floor:
            v.reason = (f"accuracy {v.accuracy:.3f} on the server's {len(y)} images, below {min_accuracy:g} x the "
                        f"median member's {float(np.median(accs)):.3f}")
        elif abs(log_scale - centre) > max_scale_mads * spread:
            v.reason = (f"logit scale {ratio:.3g}x the median member's, {abs(log_scale - centre) / spread:.1f} "
                        f"scaled MADs from it (limit {max_scale_mads:g})")
    return verdicts
