"""Parity with ART's reference attacks at equal budgets, on a small fixed digits ensemble.

Each of our attacks must leave a robust accuracy at most ART's plus
``TOLERANCE`` on the same images, model and budget: Square L-inf and L2
against ``art.attacks.evasion.SquareAttack``, APGD-CE against
``AutoProjectedGradientDescent`` and PGD against ``ProjectedGradientDescent``.

Equal budgets, as mapped by :func:`art_attack` and checked by
``test_art_gets_no_fewer_queries`` with a model wrapper that logs every
forward pass:

* Square, ``n_queries = q``: we evaluate q candidate points per image (the
  stripe init is query 1). ART evaluates the stripe init, then one
  candidate per iteration, so ``max_iter = q - 1`` gives it the same q
  candidates. It also re-evaluates its current points twice per iteration
  (a prediction on every image and the loss of the survivors), about 3x our
  forward passes, but those carry no new information.
* APGD, ``steps = s``: we and ART (``max_iter = s``) both evaluate the loss
  at s + 1 distinct points (the random start and s iterates). ART's
  ``eps_step`` is the initial step size, 2*eps in the paper and in ours.
* PGD, ``steps = s``: s gradient steps of ``2.5 * eps / s`` from one
  uniform random start, for both (``num_random_init=1``).

The helpers are shared with ``benchmarks/parity_art.py``, which prints the
same comparison as a table, on digits and on random CIFAR-shaped inputs.

The same fixed ensemble also serves two checks of the worst case: APGD
against torchattacks 3.5.1's APGD (a port of AutoAttack's) at the full
budget, with a tighter bound (0.01), and a log of every point the white-box
attacks and Square evaluate, which must find no image reported robust that
the attack had broken on the way.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("art", reason="ART is the test extra: pip install -e .[test]")

from art.attacks.evasion import AutoProjectedGradientDescent, ProjectedGradientDescent  # noqa: E402
from art.attacks.evasion import SquareAttack as ARTSquareAttack  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402

from fedrobust.attacks import APGD, BIM, FGSM, MIFGSM, PGD, SquareAttack, accuracy, predict  # noqa: E402
from fedrobust.data import load_dataset, to_float  # noqa: E402
from fedrobust.ensemble import LogitAverageEnsemble  # noqa: E402
from fedrobust.models import build_model  # noqa: E402
from fedrobust.training import TrainSettings, train_member  # noqa: E402
from strategies import Plain  # noqa: E402

# under pytest-xdist one worker runs this module, so one trained ensemble is built once
pytestmark = pytest.mark.xdist_group("parity")

TOLERANCE = 0.02
# Digits have 17 grey levels: 8/255 is half a level and leaves about 0.99 robust accuracy on this
# ensemble, so L-inf uses the docs' digits budget 0.1; L2 keeps the project default 0.5.
DIGITS_EPS_LINF = 0.1
EPS_L2 = 0.5
ATTACKS = ("square_linf", "square_l2", "apgd", "pgd")


# --------------------------------------------------------------- budgets ----

@dataclass(frozen=True)
class Budget:
    """One attack at one budget: ``iterations`` is queries for Square, steps for APGD and PGD."""

    attack: str
    eps: float
    iterations: int

    @property
    def norm(self) -> str:
        return "l2" if self.attack == "square_l2" else "linf"

    def label(self) -> str:
        levels = self.eps * 255
        eps = f"{round(levels)}/255" if abs(levels - round(levels)) < 1e-6 and levels >= 1 else f"{self.eps:.4g}"
        unit = "queries" if self.attack.startswith("square") else "steps"
        return f"{'L2' if self.norm == 'l2' else 'L∞'} ε={eps}, {self.iterations} {unit}"


Attack = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ours_attack(model: nn.Module, budget: Budget, seed: int = 0) -> Attack:
    """Our attack at ``budget``, as a callable ``(x, y) -> x_adv``."""
    if budget.attack.startswith("square"):
        return SquareAttack(model, budget.eps, budget.norm, n_queries=budget.iterations, p_init=0.8, loss="margin",
                            seed=seed)
    if budget.attack == "apgd":
        return APGD(model, budget.eps, steps=budget.iterations, loss="ce", seed=seed)
    if budget.attack == "pgd":
        return PGD(model, budget.eps, steps=budget.iterations, loss="ce", seed=seed)  # alpha = 2.5 * eps / steps
    raise ValueError(f"unknown attack '{budget.attack}'")


def art_classifier(model: nn.Module, input_shape: tuple[int, ...], nb_classes: int) -> PyTorchClassifier:
    """``model`` (logits, inputs in [0, 1]) as an ART classifier; CE is the loss its gradient attacks use.

    ``device_type="cpu"``: ART's default moves the model to a GPU when there
    is one, under our attacks, which run where the inputs are.
    """
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                             nb_classes=nb_classes, clip_values=(0.0, 1.0), device_type="cpu")


def art_attack(classifier: PyTorchClassifier, budget: Budget, n_images: int):
    """ART's reference attack at the same budget as :func:`ours_attack` (see the module docstring)."""
    batch = max(n_images, 1)  # one batch: ART's per-image schedules then see the same images as ours
    if budget.attack.startswith("square"):
        return ARTSquareAttack(classifier, norm=2 if budget.norm == "l2" else np.inf, max_iter=budget.iterations - 1,
                               eps=budget.eps, p_init=0.8, nb_restarts=1, batch_size=batch, verbose=False)
    if budget.attack == "apgd":
        return AutoProjectedGradientDescent(classifier, norm=np.inf, eps=budget.eps, eps_step=2 * budget.eps,
                                            max_iter=budget.iterations, targeted=False, nb_random_init=1,
                                            batch_size=batch, loss_type="cross_entropy", verbose=False)
    if budget.attack == "pgd":
        return ProjectedGradientDescent(classifier, norm=np.inf, eps=budget.eps,
                                        eps_step=2.5 * budget.eps / budget.iterations, max_iter=budget.iterations,
                                        targeted=False, num_random_init=1, batch_size=batch, verbose=False)
    raise ValueError(f"unknown attack '{budget.attack}'")


@contextlib.contextmanager
def global_seed(seed: int) -> Iterator[None]:
    """Seed the global RNGs ART draws from (NumPy, ``random``, torch), and restore them afterwards."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng():
        np.random.seed(seed)
        random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


# ------------------------------------------------------- forward logging ----

@dataclass
class Call:
    rows: int
    fresh: int  # rows at points never evaluated before (-1 when not tracked)
    gradient: bool  # the input requires grad: a gradient query


class QueryLog(nn.Module):
    """Passes inputs to ``model`` and logs every forward call; optionally, which rows are new points.

    ``known`` are points that do not count as fresh (the clean images: ART
    evaluates them, we never do). Tracking fresh rows hashes every row, so
    keep it for small checks.
    """

    def __init__(self, model: nn.Module, known: torch.Tensor | None = None, track_fresh: bool = False) -> None:
        super().__init__()
        self.model = model
        self.calls: list[Call] = []
        self.track_fresh = track_fresh
        self._seen: set[bytes] = set()
        if known is not None:
            self._seen.update(self._keys(known))

    @staticmethod
    def _keys(x: torch.Tensor) -> list[bytes]:
        rows = x.detach().to("cpu", torch.float32).reshape(len(x), -1).numpy()
        return [r.tobytes() for r in rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fresh = -1
        if self.track_fresh:
            keys = self._keys(x)
            fresh = len(set(keys) - self._seen)
            self._seen.update(keys)
        self.calls.append(Call(len(x), fresh, x.requires_grad))
        return self.model(x)

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.calls)


# ------------------------------------------------------------ comparison ----

@dataclass
class Parity:
    """Both robust accuracies of one comparison, with seconds and forward rows per image."""

    budget: Budget
    ours: float
    art: float
    seconds_ours: float
    seconds_art: float
    rows_ours: float
    rows_art: float
    x_adv: torch.Tensor = field(repr=False)  # ours, for validity checks

    @property
    def difference(self) -> float:
        return self.ours - self.art

    def message(self) -> str:
        return f"{self.budget.attack} ({self.budget.label()}): ours {self.ours:.3f} vs ART {self.art:.3f}"


def compare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: Budget, seed: int = 0) -> Parity:
    """Run our attack and ART's at ``budget`` on ``(x, y)``; robust accuracy is over all of ``x``."""
    with torch.no_grad():
        nb_classes = int(model(x[:1]).shape[1])
    log = QueryLog(model)
    t = time.perf_counter()
    x_ours = ours_attack(log, budget, seed)(x, y)
    seconds_ours, rows_ours = time.perf_counter() - t, log.rows / len(x)

    log = QueryLog(model)
    attack = art_attack(art_classifier(log, tuple(x.shape[1:]), nb_classes), budget, len(x))
    log.calls.clear()  # APGD's constructor probes the model once
    # ART's L2 Square divides 0/0 when its initial tile is under 2 pixels (8x8 images); it then rejects that init.
    with global_seed(seed), np.errstate(divide="ignore", invalid="ignore"):
        t = time.perf_counter()
        x_art = torch.from_numpy(attack.generate(x.numpy(), y.numpy()))
        seconds_art = time.perf_counter() - t
    return Parity(budget, accuracy(model, x_ours, y), accuracy(model, x_art, y), seconds_ours, seconds_art,
                  rows_ours, log.rows / len(x), x_ours)


def within_budget(x_adv: torch.Tensor, x: torch.Tensor, budget: Budget) -> bool:
    """``x_adv`` lies in [0, 1] and in the budget's eps-ball around ``x``."""
    delta = (x_adv - x).flatten(1)
    size = delta.norm(dim=1).max() if budget.norm == "l2" else delta.abs().max()
    return bool(x_adv.min() >= 0.0 and x_adv.max() <= 1.0 and size <= budget.eps + 1e-5)


# ---------------------------------------------------------------- digits ----

def train_digits_ensemble(members: int = 3, epochs: int = 5, seed: int = 0) -> LogitAverageEnsemble:
    """``members`` digits CNNs trained by our own ``train_member`` (plain SGD, fixed seeds), in eval mode."""
    d = load_dataset("digits")
    n_val = len(d.x_train) // 5
    models = []
    for k in range(members):
        with torch.random.fork_rng():  # initial weights from the member's seed, without touching the caller's RNG
            torch.manual_seed(seed + k)
            model = build_model("cnn", d.in_channels, d.num_classes, d.mean, d.std)
        weights, _ = train_member(model, d.x_train[n_val:], d.y_train[n_val:], d.x_train[:n_val], d.y_train[:n_val],
                                  Plain(), TrainSettings(lr=0.05, epochs=epochs, batch_size=64), seed=seed + k,
                                  progress=False)
        model.load_state_dict(weights)
        models.append(model)
    return LogitAverageEnsemble(models).eval()


def correct_sample(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n: int, seed: int = 0):
    """``n`` images drawn with a fixed seed among those ``model`` classifies correctly.

    Robust accuracy is then the fraction of the sample that stays correct, and
    neither attack can "win" an image by leaving a clean mistake in place.
    """
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        correct = model(x[order]).argmax(1) == y[order]
    chosen = order[correct][:n]
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} correctly classified images, {n} requested")
    return x[chosen], y[chosen]


def digits_budgets(queries: int, apgd_steps: int, pgd_steps: int) -> dict[str, Budget]:
    return {
        "square_linf": Budget("square_linf", DIGITS_EPS_LINF, queries),
        "square_l2": Budget("square_l2", EPS_L2, queries),
        "apgd": Budget("apgd", DIGITS_EPS_LINF, apgd_steps),
        "pgd": Budget("pgd", DIGITS_EPS_LINF, pgd_steps),
    }


# ----------------------------------------------------------------- tests ----

# Below the benchmark's (500 queries, APGD 100 steps), to keep the file near a minute on 2 cores.
TEST_IMAGES = 200
SQUARE_IMAGES = 120  # the first of them: ART's Square costs 3x our forward passes, and the gap is wide
TEST_BUDGETS = digits_budgets(queries=100, apgd_steps=30, pgd_steps=20)


@pytest.fixture(scope="module")
def digits():
    """The fixed ensemble, its clean test accuracy, and 200 correctly classified test images."""
    d = load_dataset("digits")
    ensemble = train_digits_ensemble()
    x_test = to_float(d.x_test)
    clean = accuracy(ensemble, x_test, d.y_test)
    x, y = correct_sample(ensemble, x_test, d.y_test, TEST_IMAGES)
    return ensemble, clean, x, y


@pytest.mark.slow
@pytest.mark.parametrize("attack", ATTACKS)
def test_ours_is_no_weaker_than_art(digits, attack):
    ensemble, clean, x, y = digits
    assert clean > 0.9, f"the fixed ensemble is badly trained: clean accuracy {clean:.3f}"
    budget = TEST_BUDGETS[attack]
    if attack.startswith("square"):
        x, y = x[:SQUARE_IMAGES], y[:SQUARE_IMAGES]
    result = compare(ensemble, x, y, budget)
    print(f"\n{result.message()} (ours {result.seconds_ours:.1f} s, ART {result.seconds_art:.1f} s)")
    assert within_budget(result.x_adv, x, budget), f"our {attack} left the eps-ball or [0, 1]"
    # both far from 0 and 1, or the comparison says nothing
    assert 0.05 < max(result.ours, result.art) and min(result.ours, result.art) < 0.95, result.message()
    assert result.ours <= result.art + TOLERANCE, result.message()


@pytest.mark.parametrize("attack", ATTACKS)
def test_art_gets_no_fewer_queries(digits, attack):
    """Log every forward pass of both attacks and count, per image, the points each evaluates.

    Counts per call are counts per image when every call holds every image:
    the gradient attacks step all images at every iteration (drop_broken off), and Square runs
    at an eps too small to fool anything, so no image stops early.
    """
    ensemble, _, x, y = digits
    x, y = x[:24], y[:24]
    square = attack.startswith("square")
    budget = Budget(attack, 1e-4, 30) if square else Budget(attack, DIGITS_EPS_LINF, 10)
    n = budget.iterations
    ours = QueryLog(ensemble, known=x, track_fresh=True)
    mine = ours_attack(ours, budget)
    mine.drop_broken = False  # like ART's, every step on every image (broken images leave our batch otherwise)
    x_ours = mine(x, y)
    art = QueryLog(ensemble, known=x, track_fresh=True)
    attack_art = art_attack(art_classifier(art, tuple(x.shape[1:]), 10), budget, len(x))
    art.calls.clear()  # APGD's constructor probes the model once (are its outputs probabilities?)
    with global_seed(0), np.errstate(divide="ignore", invalid="ignore"):
        attack_art.generate(x.numpy(), y.numpy())
    if square:
        assert accuracy(ensemble, x_ours, y) == 1.0, "an image was fooled at eps=1e-4: calls are not per image"
    assert all(c.rows == len(x) for c in ours.calls + art.calls), "a call left out some images"

    def points(log: QueryLog) -> int:  # calls that evaluate at least one point never seen before
        return sum(c.fresh > 0 for c in log.calls)

    def gradients(log: QueryLog) -> int:
        return sum(c.gradient for c in log.calls)

    print(f"\n{attack}: calls with new points ours {points(ours)}, ART {points(art)}; "
          f"forward passes per image ours {len(ours.calls)}, ART {len(art.calls)}; "
          f"gradients ours {gradients(ours)}, ART {gradients(art)}")
    if square:
        # the clean point first (a query of known points), then every query is a new candidate (no-op windows
        # are redrawn)
        assert len(ours.calls) == n and ours.calls[0].fresh == 0 and points(ours) == n - 1
        # ART, per step (the stripe init first): predict every image, loss at the current points, loss at the
        # candidates. Only the third call can hold new points; ART does not redraw a window that changes
        # nothing, so some of its candidates repeat earlier points, but each still costs it one query.
        assert len(art.calls) == 3 * n
        assert all(c.fresh == 0 for i, c in enumerate(art.calls) if i % 3 != 2)
        assert len(art.calls) // 3 >= len(ours.calls)
    elif attack == "apgd":
        assert points(ours) == points(art) == n + 1  # the random start and one point per step
        assert gradients(ours) == n + 1 and gradients(art) == n  # our last gradient goes unused
    else:
        assert points(ours) == gradients(ours) == gradients(art) == n
        assert points(art) == n + 1  # ART also predicts on its final point, to log its success rate
        assert points(art) >= points(ours)


# -------------------------------------------------------- the worst case ----

class PointLog(nn.Module):
    """Passes inputs to ``model`` and records, per clean image, whether any point evaluated inside the
    budget around it was misclassified. A call's rows are matched to the clean images they were drawn
    around (the nearest in L-inf; Square sends only the images it has not broken yet)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str) -> None:
        super().__init__()
        self.model, self.x, self.y, self.eps, self.norm = model, x, y, eps, norm
        self.seen_wrong = torch.zeros(len(x), dtype=torch.bool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        with torch.no_grad():
            rows = x.detach()
            if len(rows) == len(self.x):
                owner = torch.arange(len(rows))
            else:
                owner = torch.cdist(rows.flatten(1), self.x.flatten(1), p=float("inf")).argmin(1)
            delta = (rows - self.x[owner]).flatten(1)
            size = delta.norm(dim=1) if self.norm == "l2" else delta.abs().amax(1)
            inside = (size <= self.eps * (1 + 1e-6) + 1e-6) & (rows.flatten(1).amin(1) >= 0) & (rows.flatten(1).amax(1) <= 1)
            wrong = (out.argmax(1) != self.y[owner]) & inside
            self.seen_wrong[owner[wrong]] = True
        return out


WORST_CASE_EPS = (8 / 255, 0.1, 0.2)
WORST_CASE_IMAGES = 32


def _worst_case_attacks(model: nn.Module, eps: float, loss: str) -> dict[str, Callable]:
    return {
        "fgsm": lambda: FGSM(model, eps, loss),
        "bim": lambda: BIM(model, eps, steps=10, loss=loss),
        "pgd": lambda: PGD(model, eps, steps=10, loss=loss, seed=0),
        "apgd": lambda: APGD(model, eps, steps=50, loss=loss, seed=0),
        "mifgsm": lambda: MIFGSM(model, eps, steps=10, loss=loss),
    }


@pytest.mark.slow
def test_no_attack_reports_robust_an_image_it_saw_misclassified(digits):
    """Every white-box attack on the ensemble at three budgets with CE and DLR, and on each member at two
    budgets with CE; Square (L-inf, CE and margin) on the ensemble. An image counts as robust only if no point the attack
    evaluated inside the budget was misclassified."""
    ensemble, _, x, y = digits
    x, y = x[:WORST_CASE_IMAGES], y[:WORST_CASE_IMAGES]
    settings = [("ensemble", ensemble, eps, loss) for eps, loss in itertools.product(WORST_CASE_EPS, ("ce", "dlr"))]
    settings += [(f"member {k}", m, eps, "ce") for k, m in enumerate(ensemble.members) for eps in WORST_CASE_EPS[:2]]
    runs, broken_on_the_way = 0, 0
    for target_name, target, eps, loss in settings:
        log = PointLog(target, x, y, eps, "linf")
        for name, make in _worst_case_attacks(log, eps, loss).items():
            log.seen_wrong.zero_()
            res = make().run(x, y)
            answer_wrong = predict(target, res.x_adv) != y
            missed = log.seen_wrong & ~(answer_wrong | res.success)
            setting = f"{name}-{loss} on the {target_name} at eps {eps:.4g}"
            assert not bool(missed.any()), f"{setting}: {int(missed.sum())} image(s) broken on the way reported robust"
            assert not bool((res.success & ~log.seen_wrong).any()), f"{setting}: success the log never saw"
            assert within_budget(res.x_adv, x, Budget("pgd", eps, 1)), setting
            runs += 1
            broken_on_the_way += int(log.seen_wrong.sum())
    for loss in ("ce", "margin"):
        log = PointLog(ensemble, x, y, 0.1, "linf")
        res = SquareAttack(log, 0.1, "linf", n_queries=100, loss=loss, seed=0).run(x, y)
        missed = log.seen_wrong & ~((predict(ensemble, res.x_adv) != y) | res.success)
        assert not bool(missed.any()), f"square-{loss}: {int(missed.sum())} image(s) broken on the way reported robust"
        assert bool(res.success.any())
    assert runs == (3 * 2 + 3 * 2) * 5 and broken_on_the_way > 0


TORCHATTACKS_IMAGES, TORCHATTACKS_STEPS = 200, 100


@pytest.mark.slow
def test_apgd_is_no_weaker_than_torchattacks(digits):
    """APGD-CE against torchattacks 3.5.1's APGD (a port of AutoAttack's), one restart, same budget:
    ours may leave at most 0.01 more robust accuracy."""
    if os.environ.get("CI"):  # bash run.sh installs it: in CI its absence is a failure, not a skip
        import torchattacks
    else:
        torchattacks = pytest.importorskip("torchattacks", reason="bash run.sh test installs torchattacks 3.5.1")
    ensemble, _, x, y = digits
    x, y = x[:TORCHATTACKS_IMAGES], y[:TORCHATTACKS_IMAGES]
    ours = 1 - float(((predict(ensemble, (r := APGD(ensemble, DIGITS_EPS_LINF, TORCHATTACKS_STEPS, seed=0).run(x, y)).x_adv)
                       != y) | r.success).float().mean())
    with torch.random.fork_rng():  # torchattacks seeds the global RNG
        ref_attack = torchattacks.APGD(ensemble, norm="Linf", eps=DIGITS_EPS_LINF, steps=TORCHATTACKS_STEPS,
                                       n_restarts=1, seed=0, loss="ce")
        reference = accuracy(ensemble, ref_attack(x, y), y)
    print(f"\nAPGD-CE, eps {DIGITS_EPS_LINF}, {TORCHATTACKS_STEPS} steps, {len(x)} images: ours {ours:.3f}, "
          f"torchattacks {reference:.3f}")
    assert 0.05 < max(ours, reference) and min(ours, reference) < 0.95, (ours, reference)
    assert ours <= reference + 0.01, (ours, reference)


def test_apgd_t_is_no_weaker_than_torchattacks(digits):
    """APGD-T (the targeted DLR loss towards each of the 9 next-ranked classes in turn) against torchattacks
    3.5.1's APGDT, one restart, same budget, cut to fit the suite: ours leaves at most one image more robust."""
    if os.environ.get("CI"):
        import torchattacks
    else:
        torchattacks = pytest.importorskip("torchattacks", reason="bash run.sh test installs torchattacks 3.5.1")
    from fedrobust.attacks import APGDT, robust_images

    ensemble, _, x, y = digits
    x, y, steps = x[:64], y[:64], 25
    ours = int(robust_images(ensemble, APGDT(ensemble, DIGITS_EPS_LINF, steps, targets=9, seed=0), x, y, 64)
               .robust.sum())
    with torch.random.fork_rng():  # torchattacks seeds the global RNG
        ref = torchattacks.APGDT(ensemble, norm="Linf", eps=DIGITS_EPS_LINF, steps=steps, n_restarts=1,
                                 n_classes=10, seed=0)
        reference = int((predict(ensemble, ref(x, y)) == y).sum())
    print(f"\nAPGD-T, eps {DIGITS_EPS_LINF}, {steps} steps, 9 targets, {len(x)} images: robust ours {ours}, "
          f"torchattacks {reference}")
    assert 3 < max(ours, reference) and min(ours, reference) < len(y) - 3, (ours, reference)
    assert ours <= reference + 1, (ours, reference)


@pytest.mark.parametrize("targeted", [False, True], ids=["apgd-ce-l2", "apgd-t-l2"])
def test_apgd_l2_is_no_weaker_than_torchattacks(digits, targeted):
    """APGD-CE and APGD-T in L2 (AutoAttack's L2 suite) against torchattacks 3.5.1's APGD and APGDT with
    ``norm="L2"``, one restart, same budget, cut to fit the suite: ours leaves at most one image more robust, and
    every answer stays in the L2 ball and in [0, 1]."""
    if os.environ.get("CI"):
        import torchattacks
    else:
        torchattacks = pytest.importorskip("torchattacks", reason="bash run.sh test installs torchattacks 3.5.1")
    from fedrobust.attacks import APGDT, robust_images

    ensemble, _, x, y = digits
    x, y, steps = x[:64], y[:64], 25
    attack = (APGDT(ensemble, EPS_L2, steps, targets=9, seed=0, norm="l2") if targeted
              else APGD(ensemble, EPS_L2, steps, seed=0, norm="l2"))
    res = robust_images(ensemble, attack, x, y, 64)
    ours = int(res.robust.sum())
    x_adv = attack.run(x, y).x_adv
    assert float((x_adv - x).flatten(1).norm(dim=1).max()) <= EPS_L2 * (1 + 1e-5)
    assert 0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0
    with torch.random.fork_rng():  # torchattacks seeds the global RNG
        ref = (torchattacks.APGDT(ensemble, norm="L2", eps=EPS_L2, steps=steps, n_restarts=1, n_classes=10, seed=0)
               if targeted else torchattacks.APGD(ensemble, norm="L2", eps=EPS_L2, steps=steps, n_restarts=1, seed=0,
                                                  loss="ce"))
        reference = int((predict(ensemble, ref(x, y)) == y).sum())
    print(f"\nAPGD-{'T' if targeted else 'CE'} L2, eps {EPS_L2}, {steps} steps, {len(x)} images: robust ours {ours}, "
          f"torchattacks {reference}")
    assert 3 < max(ours, reference) and min(ours, reference) < len(y) - 3, (ours, reference)
    assert ours <= reference + 1, (ours, reference)
