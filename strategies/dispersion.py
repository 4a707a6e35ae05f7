"""Dispersion regularisation: ``ce + beta * sum_{i<j} cos(Hg_i, Hg_j)`` (EDLCM eq. 10).

Two forms, one objective:

* **Federated** (one member per node). The server sends every node its
  peers' current members each round; client i freezes them and computes
  their ``Hg_j`` on its own batch, so its loss is
  ``ce_i + beta * sum_{j != i} mean_n cos(Hg_i, Hg_j)``: the pairs that involve
  its own member, with the peers' directions as constants. This is block-
  coordinate descent on the joint objective: each node moves its own member
  against the peers' last-round members, so the peers it sees are at most one
  round stale. Communication: every node receives N-1 members and sends 1 per
  round, N^2 member transfers in all (N(N-1) to the nodes, N back).
* **Joint** (all members on one node: deep ensemble, centralized with N>1).
  The members train together on the same batch and the pairwise terms are
  exact, differentiable in both members of each pair.

Without augmentation the peers' ``Hg_j`` depend only on the image (the peers
are frozen and in eval mode), so the trainer computes them once per round for
the whole shard and slices them per batch (see ``peer_differences``).

``every=k`` is the opt-in lazy form described in :mod:`strategies.curvature`,
and ``grad`` (``fd`` or ``exact``) how the penalty's weight gradient is
computed (:mod:`strategies.regulariser`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import LossTerms, TrainingStrategy
from .curvature import curvature_penalty
from .hessian import default_h, gradient_difference
from .plain import Plain
from .regulariser import CLIP_GRAD_NORM, check_clip, check_grad, regularised_objective

__all__ = ["Dispersion", "pairwise_cosine", "dispersion_term"]


def pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two batches of directions, in [-1, 1]."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)


def dispersion_term(diffs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_{i<j} mean_n cos(diffs_i, diffs_j)`` (EDLCM eq. 10)."""
    total = diffs[0].new_zeros(())
    for i in range(len(diffs)):
        for j in range(i + 1, len(diffs)):
            total = total + pairwise_cosine(diffs[i], diffs[j]).mean()
    return total


class Dispersion(TrainingStrategy):
    """Dispersion only (``alpha = 0``); :class:`strategies.edlcm.EDLCM` adds the curvature term."""

    name = "dispersion"
    needs_peers = True
    needs_input_grad = True

    def __init__(
        self,
        beta: float = 0.01,
        h: float | None = None,
        alpha: float = 0.0,
        every: int = 1,
        grad: str = "fd",
        fd_step: float | None = None,
        clip_grad_norm: float | None = CLIP_GRAD_NORM,
    ) -> None:
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if h is not None and h <= 0:
            raise ValueError(f"h must be > 0, got {h}")
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        check_grad(grad, fd_step)
        check_clip(clip_grad_norm)
        self.alpha, self.beta, self.h, self.every = float(alpha), float(beta), h, int(every)
        self.grad, self.fd_step, self.clip_grad_norm = grad, fd_step, clip_grad_norm
        self._step = 0

    def begin_batch(self, step: int) -> None:
        self._step = step

    @property
    def _lazy_skip(self) -> bool:
        return self._step % self.every != 0

    def _h(self, x: torch.Tensor) -> float:
        return self.h if self.h is not None else default_h(x)

    @torch.no_grad()
    def peer_differences(self, peers: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The frozen peers' gradient differences on ``(x, y)`` (constants for the loss)."""
        out = []
        with torch.autocast(x.device.type, enabled=False):  # fp32, as the members' own differences
            for peer in peers:
                was_training = peer.training
                peer.eval()
                out.append(gradient_difference(peer, x, y, self._h(x), create_graph=False)[1])
                peer.train(was_training)
        return out

    def loss(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        peers: Sequence[nn.Module] = (),
        peer_diffs: Sequence[torch.Tensor] | None = None,
    ) -> LossTerms:
        if self._lazy_skip:
            return Plain().loss(model, x, y)
        if peer_diffs is None:
            peer_diffs = self.peer_differences(peers, x, y)

        def terms(diffs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            d = diffs[0]
            disp = sum((pairwise_cosine(d, p).mean() for p in peer_diffs), d.new_zeros(()))
            return {"curvature": curvature_penalty(d), "dispersion": disp}

        obj = self._objective([model], x, y, terms)
        out = {"ce": obj.ce[0], "dispersion": obj.terms["dispersion"]}
        if self.alpha > 0:
            out["curvature"] = obj.terms["curvature"]
        return LossTerms(obj.total, out, obj.logits[0])

    def joint_loss(self, models: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor) -> tuple[LossTerms, list[torch.Tensor]]:
        """All members on one batch with exact pairwise terms; returns the terms and each member's logits."""
        if self._lazy_skip:
            outs = [Plain().loss(m, x, y) for m in models]
            total = torch.stack([o.total for o in outs]).sum()
            return LossTerms(total, {"ce": sum(o.terms["ce"] for o in outs) / len(outs)}), [o.logits for o in outs]

        def terms(diffs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            curv = sum((curvature_penalty(d) for d in diffs[1:]), curvature_penalty(diffs[0]))
            return {"curvature": curv, "dispersion": dispersion_term(diffs)}

        obj = self._objective(models, x, y, terms)
        out = {"ce": sum(obj.ce) / len(models), "dispersion": obj.terms["dispersion"]}
        if self.alpha > 0:
            out["curvature"] = obj.terms["curvature"] / len(models)
        return LossTerms(obj.total, out), obj.logits

    def _objective(self, models, x, y, terms):
        weights = {"curvature": self.every * self.alpha, "dispersion": self.every * self.beta}
        return regularised_objective(models, x, y, h=self._h(x), terms=terms, weights=weights,
                                     grad=self.grad, fd_step=self.fd_step, clip=self.clip_grad_norm)
