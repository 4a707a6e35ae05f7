"""The ``ensemble`` config section: how the server combines its members, and which members it lets in.

Its schema and checks, next to :mod:`fedrobust.ensemble` (the combination rules) and
:mod:`fedrobust.screening` (the screening) that read it; composed into the whole config by
:mod:`fedrobust.config`. The images screening uses are set aside by ``deployment.server_images``.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from .errors import check

__all__ = ["COMBINE", "EnsembleConfig", "check_ensemble"]

COMBINE = ("mean_logits", "mean_probs", "median_probs", "trimmed_mean_probs", "majority_vote")


@dataclass
class EnsembleConfig:
    # mean_logits | mean_probs | median_probs | trimmed_mean_probs | majority_vote (fedrobust.ensemble)
    combine: str = "mean_logits"
    trim: int = 1  # trimmed_mean_probs: members dropped from each side, per class
    # reject members on the server's own images (deployment.server_images > 0): too inaccurate, or an outlier
    # logit scale; engine.on_missing decides what a rejection does to the run
    screen: bool = False
    min_accuracy: float = 0.5  # screen: reject below this fraction of the median member's accuracy there
    max_scale_mads: float = 5.0  # screen: reject a log logit scale this many (scaled) MADs from the median


def check_ensemble(cfg: DictConfig) -> None:
    e = cfg.ensemble
    check(e.combine in COMBINE, "ensemble.combine", f"unknown rule '{e.combine}' (choose from {', '.join(COMBINE)})")
    check(e.trim >= 0, "ensemble.trim", f"must be >= 0, got {e.trim}")
    n = cfg.deployment.num_nodes  # members: one per node, or num_nodes on the one node (centralized, deep_ensemble)
    check(e.combine != "trimmed_mean_probs" or 2 * e.trim < n, "ensemble.trim",
          f"trimming {e.trim} member(s) from each side leaves none of the {n} member(s)")
    check(not e.screen or cfg.deployment.server_images > 0, "ensemble.screen",
          "screening needs images of the server's own: set deployment.server_images (e.g. 500)")
    check(0.0 <= e.min_accuracy <= 1.0, "ensemble.min_accuracy", f"must be in [0, 1], got {e.min_accuracy}")
    check(e.max_scale_mads > 0, "ensemble.max_scale_mads", f"must be > 0, got {e.max_scale_mads}")
