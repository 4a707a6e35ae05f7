"""Gradient attacks in [0, 1] pixel space: FGSM, BIM, PGD, APGD, APGD-T, MI-FGSM, CWA (L-infinity), and
BIM, PGD, APGD and APGD-T in L2 (``norm="l2"``, AutoAttack's L2 suite).

Written here rather than taken from torchattacks/AutoAttack because the
project needs them to (a) take the loss by name, (b) take a list of models
(CWA's per-model inner loop), (c) use an explicit ``torch.Generator`` instead
of resetting the global RNG, and (d) never mutate their inputs. Every attack
is a small object built with its budget and called on ``(x, y)``; it returns
``x_adv`` with ``||x_adv - x||_inf <= eps`` (or ``||x_adv - x||_2 <= eps``
in L2) and ``0 <= x_adv <= 1``.

L2 (Croce & Hein 2020, as their code does it): a step moves along the
gradient divided by its per-image L2 norm instead of its sign; projection
scales the perturbation back onto the eps-ball, then clips to [0, 1] (which
can only shorten it); a random start is a Gaussian direction at radius eps
(APGD) or at a uniform fraction of eps (PGD).

Worst case (``worst_case=True``, the default of FGSM, BIM, PGD, APGD and
MI-FGSM): every forward pass on the model goes through
:class:`~fedrobust.attacks.worst_case.WorstCase`, and the answer per image
is the first evaluated point that the model misclassified, or, where there
was none, the attack's own answer (APGD's best-loss point, the others' last
iterate). ``run`` also returns which images the attack saw misclassified.
``worst_case=False`` gives the plain last iterate, which is what a transfer
attack on surrogates and adversarial training want.

Broken images leave the batch: with the worst case on, BIM, PGD and APGD
stop computing on an image once some point they evaluated was
misclassified. Its fate is then settled (``run`` answers with that point),
and every quantity of these attacks is per image (the step size, APGD's
checkpoint conditions and momentum; the model runs in eval mode), so the
images still attacked follow the same path as in the whole batch (up to the
rounding of a kernel whose result depends on the batch's size), while the
cost falls with the robust accuracy: APGD's 100 steps on an ensemble that
keeps 1 image in 1,000 cost a few steps' worth, not 100. AutoAttack's APGD
runs every step on every image of the batch it was given.

The clean point first: with the worst case on, ``run`` classifies the clean
images before the attack's first step, so that an image the model gets
wrong at ``x`` itself counts as broken even when the attack starts from a
random point (PGD, APGD) and never comes back to ``x``.

Non-finite losses (``nonfinite``): a loss whose value or input gradient is
NaN or infinite on an image would stop the attack there silently
(``sign(NaN)`` is 0), and the image would count as robust. By default
(``"error"``) the attack raises :class:`NonFiniteLoss`, naming the attack,
the loss and how many images; with ``"ce"`` it takes cross-entropy's value
and gradient for those images at those steps instead, and ``run`` says
which images needed it (``AttackResult.fallback``).

CWA (MI-Common-Weakness, Chen et al., ICLR 2024) per outer iteration t:

1. reverse step (the SAM-like inner max of the *training* view):
   ``x_r = x_t - r * sign(grad L_ens(x_t))`` with ``r = eps/15``; it moves
   towards a flatter region of the ensemble loss;
2. cosine-similarity-encouraging inner loop over the K surrogates, in order:
   ``m_in <- mu * m_in + g_k / ||g_k||_2``, ``x <- x + a_in * m_in``;
3. outer momentum step with the inner loop's displacement as the gradient:
   ``m_out <- mu * m_out + d / ||d||_1`` with ``d = x - x_t``,
   ``x_{t+1} = x_t + eps/5 * sign(m_out)``;

each followed by projection onto the eps-ball and [0, 1]. Differences from
the official code: the outer step is ``eps/5`` (derived from eps, not fixed
at 16/255/5), ``||d||_1`` is per image (not over the whole batch), and no
device is hard-coded. The inner step ``a_in`` is scaled for the image
dimension D: the official 250 at eps=16/255 and D=3*224*224 moves a unit-L2
direction by about 10.3 eps per pixel (RMS); we keep that ratio,
``a_in = 10.3 * eps * sqrt(D)``, so the inner loop behaves the same on 8x8
digits, 32x32 CIFAR and ImageNet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import OneLineFailure
from .losses import LOSSES, attack_loss
from .worst_case import AttackResult, WorstCase

__all__ = ["APGD", "APGDT", "BIM", "CWA", "FGSM", "MIFGSM", "NONFINITE", "NORMS", "NonFiniteLoss", "PGD",
           "build_gradient_attack", "targeted_dlr"]

NONFINITE = ("error", "ce")  # what an attack does where its loss or gradient is not finite
NORMS = ("linf", "l2")


class NonFiniteLoss(OneLineFailure):
    """An attack's loss value or input gradient was NaN or infinite on some images."""

Model = Callable[[torch.Tensor], torch.Tensor]

# Official CWA inner step (250) at eps = 16/255 on 3x224x224 images, as a per-pixel multiple of eps.
CWA_INNER_RATIO = 250.0 / ((16 / 255) * math.sqrt(3 * 224 * 224))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _project_l2(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    delta = x_adv - x
    scale = (eps / _per_sample_norm(delta, 2)).clamp(max=1.0)
    return (x + delta * scale).clamp_(0.0, 1.0)


def _per_sample_norm(g: torch.Tensor, p: float) -> torch.Tensor:
    return g.flatten(1).norm(p=p, dim=1).clamp_min(1e-12).view(-1, *([1] * (g.dim() - 1)))


def _grad(
    model: Model, loss_fn, x: torch.Tensor, y: torch.Tensor, seen: WorstCase | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed per-sample loss w.r.t. x, and the per-sample loss; ``seen`` observes the logits."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        loss = loss_fn(logits, y)
        (g,) = torch.autograd.grad(loss.sum(), x)
    if seen is not None:
        seen.observe(x, logits)
    return g, loss.detach()


class _GradientAttack:
    """A white-box attack on one model; subclasses define :meth:`attack` (the answer without the worst case)."""

    norms: tuple[str, ...] = ("linf",)  # the norms the attack is written for

    def __init__(self, model: Model | nn.Module, eps: float = 8 / 255, loss: str = "ce", worst_case: bool = True,
                 nonfinite: str = "error", norm: str = "linf") -> None:
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE)}, got '{nonfinite}'")
        if norm not in self.norms:
            raise ValueError(f"{type(self).__name__} is written for {' and '.join(self.norms)}, not '{norm}'")
        self.norm = norm
        self.model = model
        self.eps = float(eps)
        self.loss_name = loss
        self.loss_fn = attack_loss(loss)
        self.worst_case = bool(worst_case)
        self.nonfinite = nonfinite
        self._fallback: torch.Tensor | None = None  # per image of the running batch: cross-entropy stood in
        self._rows: torch.Tensor | None = None  # the batch's images the running attack works on (None: all)

    @property
    def label(self) -> str:
        return type(self).__name__ + ("-L2" if self.norm == "l2" else "")

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x_adv`` brought back into the eps-ball around ``x`` (in the attack's norm) and into [0, 1]."""
        return _project(x_adv, x, self.eps) if self.norm == "linf" else _project_l2(x_adv, x, self.eps)

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of unit size in the attack's norm: ``sign(g)``, or ``g / ||g||_2``."""
        return g.sign() if self.norm == "linf" else g / _per_sample_norm(g, 2)

    def start(self, x: torch.Tensor, generator: torch.Generator, on_sphere: bool) -> torch.Tensor:
        """A random point of the eps-ball around ``x`` (L-inf: uniform; L2: a Gaussian direction at radius eps,
        or at a uniform fraction of it unless ``on_sphere``), in [0, 1]."""
        if self.norm == "linf":
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            return _project(x + (2 * noise - 1) * self.eps, x, self.eps)
        u = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        radius = torch.full((len(x),), self.eps, dtype=x.dtype) if on_sphere else \
            self.eps * torch.rand(len(x), generator=generator, dtype=x.dtype)
        u = u / _per_sample_norm(u, 2) * radius.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        return _project_l2(x + u, x, self.eps)

    def grad(self, x: torch.Tensor, y: torch.Tensor, seen: WorstCase | None) -> tuple[torch.Tensor, torch.Tensor]:
        g, loss = _grad(self.model, self.loss_fn, x, y, seen)
        bad = ~(torch.isfinite(loss) & torch.isfinite(g.flatten(1)).all(1))
        if not bool(bad.any()):
            return g, loss
        name = self.loss_name if isinstance(self.loss_name, str) else getattr(self.loss_name, "__name__", "callable")
        if self.nonfinite == "error":
            raise NonFiniteLoss(
                f"{self.label}: loss '{name}' gave a non-finite value or gradient on {int(bad.sum())} of {len(bad)} "
                "image(s) of a batch; such images would count as robust. Fix the loss, or set attack.nonfinite=ce "
                "to use cross-entropy on those images (their number is recorded)")
        rows = bad.nonzero().squeeze(1)
        g_ce, loss_ce = _grad(self.model, LOSSES["ce"], x[rows], y[rows])
        g, loss = g.clone(), loss.clone()
        g[rows], loss[rows] = g_ce, loss_ce
        if self._fallback is not None:
            self._fallback[rows if self._rows is None else self._rows[rows]] = True
        return g, loss

    def attack(self, x: torch.Tensor, y: torch.Tensor, seen: WorstCase | None) -> torch.Tensor:
        raise NotImplementedError

    def _grad_on(self, x: torch.Tensor, y: torch.Tensor, seen, active: torch.Tensor | None):
        """:meth:`grad` on the images ``active`` of the running batch (all of them if None): ``seen`` and the
        fallback record are indexed through it."""
        if active is None:
            return self.grad(x, y, seen)
        outer = self._rows
        self._rows = active if outer is None else outer[active]
        try:
            return self.grad(x, y, _Rows(seen, active))
        finally:
            self._rows = outer

    def _restrict(self, active: torch.Tensor | None) -> None:
        """The running batch narrowed to ``active`` (None: whole again); an attack whose loss holds per-image
        state (APGD-T's target classes) narrows it here."""

    # BIM, PGD, APGD: stop computing on an image once the worst case found it broken (False: every step on every
    # image, as AutoAttack; the answers are the same)
    drop_broken: bool = True
    restarts: int = 1  # runs from fresh random starts, each on the images still robust (PGD, APGD)

    def run(self, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        """The answer per image, whether the attack saw it misclassified (never, with ``worst_case=False``),
        and where cross-entropy stood in for a non-finite loss."""
        x = x.detach()
        self._fallback = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        seen = WorstCase(x, y, self.eps, self.norm) if self.worst_case else None
        if seen is not None:  # the clean point first: an image wrong at x is broken, wherever the attack starts
            with torch.no_grad():
                seen.observe(x, self.model(x))
        x_adv = self.attack(x, y, seen).detach()
        for _ in range(1, self.restarts if seen is not None else 1):  # later restarts: the images still robust
            rows = (~seen.found).nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            self._rows = rows
            try:
                x_adv[rows] = self.attack(x[rows], y[rows], _Rows(seen, rows)).detach()
            finally:
                self._rows = None
        fallback, self._fallback = self._fallback, None
        if seen is None:
            return AttackResult(x_adv, torch.zeros(len(x), dtype=torch.bool, device=x.device), fallback)
        result = seen.result(x_adv)
        result.fallback = fallback
        return result

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.run(x, y).x_adv


class _Rows:
    """A view of a :class:`WorstCase` on some of its images: an attack run on ``x[rows]`` observes into it."""

    def __init__(self, seen: WorstCase, rows: torch.Tensor) -> None:
        self.seen, self.rows = seen, rows

    @property
    def found(self) -> torch.Tensor:
        return self.seen.found[self.rows]

    def observe(self, x_eval: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        self.seen.observe(x_eval, logits, self.rows if rows is None else self.rows[rows])


class _Live:
    """The images of a running batch still attacked: those ``seen`` has not found broken (all, without a
    worst case). :meth:`drop` narrows them; ``rows`` is None while the batch is whole."""

    def __init__(self, seen, n: int, device, enabled: bool = True) -> None:
        self.seen = seen if enabled else None
        self.active = torch.arange(n, device=device)
        self.rows: torch.Tensor | None = None
        self.gone = self.active[:0]

    def drop(self) -> torch.Tensor | None:
        """The mask of the active images to keep, if some were found broken since the last call (they are then
        ``gone``); None when nothing changed."""
        if self.seen is None:
            return None
        keep = ~self.seen.found[self.active]
        if bool(keep.all()):
            return None
        self.gone, self.active = self.active[~keep], self.active[keep]
        self.rows = self.active
        return keep


class FGSM(_GradientAttack):
    """One step of size eps along the gradient sign (Goodfellow et al. 2015)."""

    def attack(self, x, y, seen):
        g, _ = self.grad(x, y, seen)
        return _project(x + self.eps * g.sign(), x, self.eps)


class BIM(_GradientAttack):
    """Iterative FGSM from the clean point (Kurakin et al. 2017), step alpha (default 2.5*eps/steps)."""

    norms = NORMS

    def __init__(self, model, eps=8 / 255, steps=10, alpha=None, loss="ce", worst_case=True, nonfinite="error",
                 norm="linf"):
        super().__init__(model, eps, loss, worst_case, nonfinite, norm)
        self.steps = int(steps)
        self.alpha = alpha if alpha is not None else 2.5 * self.eps / max(self.steps, 1)
        self.random_start = False
        self.generator: torch.Generator | None = None

    def attack(self, x, y, seen):
        x_adv = self.start(x, self.generator, on_sphere=False) if self.random_start else x.clone()
        out, live = x_adv, _Live(seen, len(x), x.device, self.drop_broken)
        for _ in range(self.steps):
            keep = live.drop()
            if keep is not None:
                out[live.gone] = x_adv[~keep]
                if live.active.numel() == 0:
                    return out
                x, y, x_adv = x[keep], y[keep], x_adv[keep]
            g, _ = self._grad_on(x_adv, y, seen, live.rows)
            x_adv = self.project(x_adv + self.alpha * self.direction(g), x)
        if live.rows is None:
            return x_adv
        out[live.active] = x_adv
        return out


class PGD(BIM):
    """BIM from a uniform random start in the eps-ball (Madry et al. 2018)."""

    def __init__(self, model, eps=8 / 255, steps=10, alpha=None, loss="ce", seed=0, worst_case=True,
                 nonfinite="error", restarts=1, norm="linf"):
        super().__init__(model, eps, steps, alpha, loss, worst_case, nonfinite, norm)
        self.random_start = True
        self.generator = torch.Generator().manual_seed(seed)
        self.restarts = int(restarts)


class MIFGSM(_GradientAttack):
    """Momentum iterative FGSM (Dong et al. 2018): g <- mu*g + grad/||grad||_1, step eps/steps."""

    def __init__(self, model, eps=8 / 255, steps=10, alpha=None, mu=1.0, loss="ce", worst_case=True,
                 nonfinite="error"):
        super().__init__(model, eps, loss, worst_case, nonfinite)
        self.steps, self.mu = int(steps), float(mu)
        self.alpha = alpha if alpha is not None else self.eps / max(self.steps, 1)

    def step(self, x, x_adv, y, momentum, seen=None):
        g, _ = self.grad(x_adv, y, seen)
        momentum = self.mu * momentum + g / _per_sample_norm(g, 1)
        return _project(x_adv + self.alpha * momentum.sign(), x, self.eps), momentum

    def attack(self, x, y, seen):
        x_adv, momentum = x.clone(), torch.zeros_like(x)
        for _ in range(self.steps):
            x_adv, momentum = self.step(x, x_adv, y, momentum, seen)
        return x_adv


class CWA:
    """MI-Common-Weakness on a list of surrogate models (see the module docstring)."""

    def __init__(
        self,
        models: Sequence[Model],
        eps: float = 8 / 255,
        steps: int = 10,
        mu: float = 1.0,
        reverse_step: float | None = None,
        outer_step: float | None = None,
        inner_step: float | None = None,
        loss: str = "ce",
    ) -> None:
        if len(models) == 0:
            raise ValueError("CWA needs at least one surrogate model")
        self.models = list(models)
        self.eps, self.steps, self.mu = float(eps), int(steps), float(mu)
        self.reverse_step = reverse_step if reverse_step is not None else self.eps / 15
        self.outer_step = outer_step if outer_step is not None else self.eps / 5
        self.inner_step = inner_step  # None: CWA_INNER_RATIO * eps * sqrt(D), set per input
        self.loss_fn = attack_loss(loss)

    def _ensemble(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.models]).mean(0)

    def step(self, x, x_adv, y, m_in, m_out):
        d = x[0].numel()
        inner = self.inner_step if self.inner_step is not None else CWA_INNER_RATIO * self.eps * math.sqrt(d)
        # 1. reverse (flattening) step on the ensemble loss
        g, _ = _grad(self._ensemble, self.loss_fn, x_adv, y)
        x_r = _project(x_adv - self.reverse_step * g.sign(), x, self.eps)
        # 2. per-model inner loop, encouraging aligned gradients
        x_in = x_r
        for model in self.models:
            g, _ = _grad(model, self.loss_fn, x_in, y)
            m_in = self.mu * m_in + g / _per_sample_norm(g, 2)
            x_in = _project(x_in + inner * m_in, x, self.eps)
        # 3. outer momentum step from the start of this iteration
        disp = x_in - x_adv
        m_out = self.mu * m_out + disp / _per_sample_norm(disp, 1)
        return _project(x_adv + self.outer_step * m_out.sign(), x, self.eps), m_in, m_out

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = x.detach().clone()
        m_in, m_out = torch.zeros_like(x), torch.zeros_like(x)
        for _ in range(self.steps):
            x_adv, m_in, m_out = self.step(x, x_adv, y, m_in, m_out)
        return x_adv.detach()


class APGD(_GradientAttack):
    """Auto-PGD, L-infinity or L2 (Croce & Hein, ICML 2020, Alg. 1).

    Step size starts at 2*eps and is halved at checkpoints w_j when fewer than
    rho=0.75 of the steps since the last checkpoint increased the loss, or when
    neither the step size nor the best loss changed; after halving, the
    iterate restarts from the best point. Momentum alpha=0.75. Returns, per
    image, the first point evaluated that was misclassified, else the point of
    highest loss (as AutoAttack's ``x_best_adv``).
    """

    norms = NORMS

    def __init__(self, model, eps=8 / 255, steps=100, loss="ce", rho=0.75, alpha=0.75, seed=0, worst_case=True,
                 nonfinite="error", restarts=1, norm="linf"):
        super().__init__(model, eps, loss, worst_case, nonfinite, norm)
        self.steps, self.rho, self.alpha = int(steps), rho, alpha
        self.restarts = int(restarts)
        self.generator = torch.Generator().manual_seed(seed)
        self.checkpoints = self._checkpoints(self.steps)

    @staticmethod
    def _checkpoints(n_iter: int) -> list[int]:
        p = [0.0, 0.22]
        while p[-1] < 1:
            p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        return sorted({math.ceil(q * n_iter) for q in p if q <= 1})

    def attack(self, x, y, seen):
        n = x.shape[0]
        shape = (n,) + (1,) * (x.dim() - 1)
        x_cur = self.start(x, self.generator, on_sphere=True)
        out, live = x_cur.clone(), _Live(seen, n, x.device, self.drop_broken)
        g, loss = self.grad(x_cur, y, seen)
        eta = torch.full(shape, 2 * self.eps, device=x.device, dtype=x.dtype)
        x_best, loss_best, g_best = x_cur.clone(), loss.clone(), g.clone()
        x_prev = x_cur.clone()
        # first step: plain gradient step
        x_next = self.project(x_cur + eta * self.direction(g), x)
        successes = torch.zeros(n, device=x.device)
        loss_prev = loss.clone()
        last_ckpt, eta_at_ckpt, best_at_ckpt = 0, eta.clone(), loss_best.clone()
        ckpts = set(self.checkpoints[1:])
        for k in range(1, self.steps + 1):
            keep = live.drop()
            if keep is not None:  # images found broken leave the batch with their best point
                out[live.gone] = x_best[~keep]
                if live.active.numel() == 0:
                    self._restrict(None)
                    return out
                x, y, x_cur, x_next = x[keep], y[keep], x_cur[keep], x_next[keep]
                x_best, g_best, eta, eta_at_ckpt = x_best[keep], g_best[keep], eta[keep], eta_at_ckpt[keep]
                loss_best, best_at_ckpt = loss_best[keep], best_at_ckpt[keep]
                loss_prev, successes = loss_prev[keep], successes[keep]
                n = len(x)
                shape = (n,) + shape[1:]
                self._restrict(live.active)
            x_prev, x_cur = x_cur, x_next
            g, loss = self._grad_on(x_cur, y, seen, live.rows)
            improved = loss > loss_best
            successes += (loss > loss_prev).float()  # condition 1 counts increases over the previous iterate
            loss_prev = loss
            x_best = torch.where(improved.view(shape), x_cur, x_best)
            g_best = torch.where(improved.view(shape), g, g_best)
            loss_best = torch.where(improved, loss, loss_best)
            if k in ckpts:
                window = k - last_ckpt
                cond1 = successes < self.rho * window
                cond2 = (eta.view(n) == eta_at_ckpt.view(n)) & (loss_best == best_at_ckpt)
                halve = cond1 | cond2
                eta = torch.where(halve.view(shape), eta / 2, eta)
                x_cur = torch.where(halve.view(shape), x_best, x_cur)
                x_prev = torch.where(halve.view(shape), x_best, x_prev)  # no momentum across a restart
                g = torch.where(halve.view(shape), g_best, g)
                loss_prev = torch.where(halve, loss_best, loss_prev)
                successes.zero_()
                last_ckpt, eta_at_ckpt, best_at_ckpt = k, eta.clone(), loss_best.clone()
            if k == self.steps:
                break
            z = self.project(x_cur + eta * self.direction(g), x)
            x_next = self.project(x_cur + self.alpha * (z - x_cur) + (1 - self.alpha) * (x_cur - x_prev), x)
        out[live.active] = x_best
        self._restrict(None)
        return out


def targeted_dlr(target: torch.Tensor):
    """The targeted DLR loss of Croce & Hein (2020), towards class ``target`` per image, larger is more
    adversarial: ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` (``pi`` sorts the logits down)."""

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        top = logits.sort(dim=1, descending=True).values
        k = logits.shape[1]
        third, fourth = top[:, min(2, k - 1)], top[:, min(3, k - 1)]
        z_y = logits.gather(1, y[:, None]).squeeze(1)
        z_t = logits.gather(1, target[:, None]).squeeze(1)
        return -(z_y - z_t) / (top[:, 0] - (third + fourth) / 2 + 1e-12)

    return loss


class APGDT(APGD):
    """APGD with the targeted DLR loss (APGD-T, AutoAttack's standard suite): for each of the ``targets``
    classes the clean logits rank highest after the true one, in turn, a run of APGD that pushes that class
    above the true one, on the images still robust. The loss is fixed (``loss`` is not taken)."""

    def __init__(self, model, eps=8 / 255, steps=100, targets=9, rho=0.75, alpha=0.75, seed=0, worst_case=True,
                 nonfinite="error", restarts=1, norm="linf"):
        super().__init__(model, eps, steps, "dlr", rho, alpha, seed, worst_case, nonfinite, restarts, norm)
        self.loss_name = "dlr-targeted"
        self.targets = int(targets)
        self._target: torch.Tensor | None = None  # the target class per image of the running APGD

    def _restrict(self, active):
        if self._target is not None:
            self.loss_fn = targeted_dlr(self._target if active is None else self._target[active])

    def attack(self, x, y, seen):
        with torch.no_grad():
            order = self.model(x).sort(dim=1, descending=True).indices
        classes = order.shape[1]
        x_adv = x.clone()
        for k in range(1, min(self.targets, classes - 1) + 1):
            ranked = order[:, k - 1 : k + 1]  # the k-th class after the true one: skip y wherever it ranks
            before = (order[:, :k] == y[:, None]).any(1)
            target = torch.where(before, ranked[:, 1], ranked[:, 0])
            if seen is None:
                rows = torch.arange(len(x), device=x.device)
                view = None
            else:
                rows = (~seen.found).nonzero().squeeze(1)
                if rows.numel() == 0:
                    break
                view = _Rows(seen, rows)  # a view of a view observes through both
            self._target = target[rows]
            self.loss_fn = targeted_dlr(self._target)
            outer = self._rows
            self._rows = rows if outer is None else outer[rows]
            try:
                x_adv[rows] = super().attack(x[rows], y[rows], view)
            finally:
                self._rows = outer
        return x_adv


def build_gradient_attack(name: str, model, eps: float, steps: int, loss: str, seed: int = 0, worst_case: bool = True,
                          nonfinite: str = "error", restarts: int = 1, targets: int = 9):
    """A white-box attack by name: fgsm, bim, pgd, apgd, apgd_t, mifgsm (L-inf), pgd_l2, apgd_l2, apgd_t_l2 (L2)."""
    base, norm = (name[:-3], "l2") if name.endswith("_l2") else (name, "linf")
    common = {"loss": loss, "worst_case": worst_case, "nonfinite": nonfinite}
    if base == "apgd_t":
        return APGDT(model, eps, steps, targets=targets, seed=seed, worst_case=worst_case, nonfinite=nonfinite,
                     restarts=restarts, norm=norm)
    if base == "pgd":
        return PGD(model, eps, steps, seed=seed, restarts=restarts, norm=norm, **common)
    if base == "apgd":
        return APGD(model, eps, steps, seed=seed, restarts=restarts, norm=norm, **common)
    if norm == "linf" and base == "fgsm":
        return FGSM(model, eps, **common)
    if norm == "linf" and base == "bim":
        return BIM(model, eps, steps, **common)
    if norm == "linf" and base == "mifgsm":
        return MIFGSM(model, eps, steps, **common)
    raise ValueError(f"unknown white-box attack '{name}' (choose from fgsm, bim, pgd, apgd, apgd_t, mifgsm, pgd_l2, "
                     "apgd_l2, apgd_t_l2)")
