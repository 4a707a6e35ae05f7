"""Square Attack (Andriushchenko et al., ECCV 2020), score-based, L-infinity and L2.

Written here because the project needs an attack that takes nothing but a
callable returning logits, counts every forward pass on an image as one
query, stops each image at its first success, and draws its randomness from
an explicit ``torch.Generator``. The clean images are classified first,
and that forward pass is a query like any other (AutoAttack does not count
it): an image misclassified at ``x`` is broken after one query and never
searched, and a budget of ``n_queries`` covers the clean point, the
initialisation and ``n_queries - 2`` search steps. Only the images still correctly classified
are sent to the model at each iteration, so a batch costs one forward pass
over the survivors per iteration. Every query goes through
:class:`~fedrobust.attacks.worst_case.WorstCase`: an image stops at the first
point the model misclassifies, and that point is the answer, even with the
``ce`` loss, whose random search would otherwise keep a lower-loss point
that is still classified correctly.

Algorithm (paper, Alg. 1-3):

* loss: margin ``z_y - max_{j != y} z_j`` (minimised, success when < 0), or
  ``ce`` (minimise ``-CE``); success is always "misclassified".
* p-schedule: ``p_init`` halved at iterations 10, 50, 200, 500, 1000, 2000,
  4000, 6000, 8000 of a 10,000-query run, rescaled to the budget.
* L-inf: vertical-stripe init (``+-eps`` per column and channel); each step
  sets a random s x s window (``s = round(sqrt(p * H * W))``) to ``+-eps``
  per channel and keeps it if the loss decreases.
* L2: init with a grid of "meta pseudo-Gaussian" squares scaled to norm eps;
  each step moves the perturbation's energy from a second random window into
  the first, with a fresh meta pseudo-Gaussian pattern added to the old one,
  keeping the total L2 norm at eps. As in the paper's code, this is done per
  channel: each channel keeps its energy, and the old and new patterns have
  equal weight in it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..progress import progress as progress_bar
from .losses import margin
from .worst_case import WorstCase

__all__ = ["SquareAttack", "SquareResult", "p_schedule"]

_BREAKS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, it: int, n_queries: int) -> float:
    """Fraction of pixels changed at iteration ``it`` (the paper's schedule, rescaled to the budget)."""
    it = int(it / n_queries * 10000)
    halvings = sum(it > b for b in _BREAKS)
    return p_init / (2**halvings)


@dataclass
class SquareResult:
    x_adv: torch.Tensor
    queries: torch.Tensor  # per image, the clean point's query included (1 for an image misclassified at x)
    success: torch.Tensor  # per image: some query inside the budget was misclassified (``x_adv`` is that point)


def _pseudo_gaussian(h: int, w: int, device) -> torch.Tensor:
    """Concentric rectangles weighted 1/(k+1)^2 around the centre, unit L2 norm."""
    delta = torch.zeros(h, w, device=device)
    ch, cw = h // 2, w // 2
    for k in range(max(ch, cw) + 1):
        delta[max(ch - k, 0) : min(ch + k + 1, h), max(cw - k, 0) : min(cw + k + 1, w)] += 1.0 / (k + 1) ** 2
    return delta / delta.norm().clamp_min(1e-12)


def _meta_pseudo_gaussian(s: int, generator: torch.Generator, device) -> torch.Tensor:
    """Two pseudo-Gaussian blobs of opposite sign (top/bottom), randomly transposed; unit L2 norm."""
    delta = torch.zeros(s, s, device=device)
    delta[: s // 2] = _pseudo_gaussian(s // 2, s, device)
    delta[s // 2 :] = -_pseudo_gaussian(s - s // 2, s, device)
    delta = delta / delta.norm().clamp_min(1e-12)
    if torch.rand(1, generator=generator).item() > 0.5:
        delta = delta.t()
    return delta


def _channel_norm(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2).sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12)


class SquareAttack:
    """Score-based random search inside the eps-ball; budget counted in forward passes per image."""

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        eps: float = 8 / 255,
        norm: str = "linf",
        n_queries: int = 500,
        p_init: float = 0.8,
        loss: str = "margin",
        seed: int = 0,
    ) -> None:
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got '{norm}'")
        if loss not in ("margin", "ce"):
            raise ValueError(f"Square loss must be 'margin' or 'ce', got '{loss}'")
        if n_queries < 1:
            raise ValueError(f"n_queries must be >= 1, got {n_queries}")
        self.model, self.eps, self.norm = model, float(eps), norm
        self.n_queries, self.p_init, self.loss = int(n_queries), float(p_init), loss
        self.seed = seed

    # ----------------------------------------------------------------- api --
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(x, y).x_adv

    @torch.no_grad()
    def run(self, x: torch.Tensor, y: torch.Tensor, progress: bool = False) -> SquareResult:
        g = torch.Generator().manual_seed(self.seed)
        x = x.detach()
        n = x.shape[0]
        queries = torch.zeros(n, dtype=torch.long, device=x.device)
        seen = WorstCase(x, y, self.eps, self.norm)
        # the clean point first, as one query: an image misclassified at x is broken before any search
        seen.observe(x, self.model(x))
        queries += 1
        x_best = self._init(x, g)
        loss_best = torch.full((n,), float("inf"), device=x.device)
        start = (~seen.found).nonzero().squeeze(1)
        if start.numel() and self.n_queries > 1:
            loss_best[start] = self._query(x_best[start], y[start], seen, start)
            queries[start] += 1
        bar = progress_bar(total=max(self.n_queries - 2, 0), desc=f"square {self.norm}", enabled=progress, leave=False)
        for it in range(1, self.n_queries - 1):
            active = (~seen.found).nonzero().squeeze(1)  # still correctly classified
            if active.numel() == 0:
                break
            bar.update(1)
            if it % 50 == 0:
                bar.set_postfix(robust=int(active.numel()), refresh=False)
            xa, xb = x[active], x_best[active]
            x_new = self._step_linf(xa, xb, it, g) if self.norm == "linf" else self._step_l2(xa, xb, it, g)
            loss_new = self._query(x_new, y[active], seen, active)
            queries[active] += 1
            better = loss_new < loss_best[active]
            idx = active[better]
            x_best[idx] = x_new[better]
            loss_best[idx] = loss_new[better]
        bar.close()
        return SquareResult(x_adv=seen.select(x_best), queries=queries, success=seen.found)

    # ------------------------------------------------------------ internals --
    def _query(self, x: torch.Tensor, y: torch.Tensor, seen: WorstCase,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """The loss to minimise, from one forward pass that ``seen`` observes."""
        logits = self.model(x)
        seen.observe(x, logits, rows)
        if self.loss == "margin":
            return -margin(logits, y)
        return -F.cross_entropy(logits, y, reduction="none")

    def _rand_sign(self, shape, g, device) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=g) * 2 - 1).to(device=device, dtype=torch.float32)

    def _init(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.norm == "linf":
            stripes = self.eps * self._rand_sign((n, c, 1, w), g, x.device)  # vertical stripes
            return (x + stripes).clamp(0.0, 1.0)
        s = max(h // 5, 1)
        delta = torch.zeros_like(x)
        start = (h - s * (h // s)) // 2
        for vh in range(start, h - s + 1, s):
            for vw in range(start, w - s + 1, s):
                pattern = _meta_pseudo_gaussian(s, g, x.device) if s > 1 else torch.ones(1, 1, device=x.device)
                delta[:, :, vh : vh + s, vw : vw + s] += pattern * self._rand_sign((n, c, 1, 1), g, x.device)
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return (x + delta * (self.eps / norms)).clamp(0.0, 1.0)  # the init uses the whole L2 budget

    def _window(self, it: int, h: int, w: int, minimum: int) -> int:
        p = p_schedule(self.p_init, it, self.n_queries)
        s = int(round(math.sqrt(p * h * w)))
        return min(max(s, minimum), h - 1 if h > 1 else 1)

    def _step_linf(self, x, x_best, it, g):
        n, c, h, w = x.shape
        s = self._window(it, h, w, 1)
        vh = int(torch.randint(0, h - s + 1, (1,), generator=g))
        vw = int(torch.randint(0, w - s + 1, (1,), generator=g))
        win = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
        current = x_best[win]
        signs = self._rand_sign((n, c, 1, 1), g, x.device)
        # Resample images whose window would not change (a wasted query), as the paper's code does.
        for _ in range(10):
            same = ((x[win] + self.eps * signs).clamp(0.0, 1.0) - current).abs().flatten(1).amax(1) < 1e-7
            if not bool(same.any()):
                break
            signs[same] = self._rand_sign((int(same.sum()), c, 1, 1), g, x.device)
        x_new = x_best.clone()
        x_new[win] = (x[win] + self.eps * signs).clamp(0.0, 1.0)
        return x_new

    def _step_l2(self, x, x_best, it, g):
        n, c, h, w = x.shape
        s = self._window(it, h, w, 3)
        if s % 2 == 0 and s + 1 <= h:
            s += 1
        s = min(s, h)
        vh, vw, vh2, vw2 = (int(v) for v in torch.randint(0, h - s + 1, (4,), generator=g))
        delta = x_best - x
        mask = torch.zeros(1, 1, h, w, device=x.device)
        mask[..., vh : vh + s, vw : vw + s] = 1
        mask[..., vh2 : vh2 + s, vw2 : vw2 + s] = 1
        # Per channel, as in the paper's code: the energy of both windows, plus an equal share of the budget
        # that clipping left unspent, is re-spent on window 1, along the new pattern plus the old one, each of
        # unit norm in every channel (normalising over all channels at once lets the new pattern swamp the old).
        slack = (self.eps**2 - delta.flatten(1).pow(2).sum(1)).clamp_min(0).view(-1, 1, 1, 1) / c
        budget = (slack + (delta * mask).pow(2).sum((2, 3), keepdim=True)).sqrt()
        old = delta[:, :, vh : vh + s, vw : vw + s]
        old = old / _channel_norm(old)
        new = _meta_pseudo_gaussian(s, g, x.device) * self._rand_sign((n, c, 1, 1), g, x.device) + old
        new = new / _channel_norm(new) * budget
        delta = delta * (1 - mask)
        delta[:, :, vh : vh + s, vw : vw + s] = new
        return (x + self._project_l2(delta)).clamp(0.0, 1.0)

    def _project_l2(self, delta: torch.Tensor) -> torch.Tensor:
        norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        return delta * torch.clamp(self.eps / norms.clamp_min(1e-12), max=1.0)
