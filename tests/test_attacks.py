"""Attack properties: budget, range, no input mutation, determinism, honest query counts, strength."""

import math

import pytest
import torch

from fedrobust.attacks import APGD, BIM, CWA, FGSM, MIFGSM, PGD, SquareAttack, accuracy
from fedrobust.attacks.gradient import CWA_INNER_RATIO
from fedrobust.attacks.losses import LOSSES, attack_loss, margin
from fedrobust.attacks.square import p_schedule
from fedrobust.training import TrainSettings, train_member
from strategies import Plain

# under pytest-xdist one worker runs this module, so its trained models are built once
pytestmark = pytest.mark.xdist_group("attacks")

EPS = 8 / 255


def _synthetic(n, seed):
    """3x16x16 images whose label is the sign of a fixed random direction: high-dimensional, small margins."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3 * 16 * 16, generator=torch.Generator().manual_seed(99))
    x = torch.rand(n, 3, 16, 16, generator=g)
    y = ((x.flatten(1) - 0.5) @ w > 0).long()
    return x, y


@pytest.fixture(scope="module")
def models():
    """Two small undefended models, trained with the project's own training function."""
    x, y = _synthetic(4400, 0)
    out = []
    for seed, hidden in ((1, None), (2, 32)):  # a logistic regression and a small MLP
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            layers = [torch.nn.Linear(768, 2)] if hidden is None else [
                torch.nn.Linear(768, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2)]
            m = torch.nn.Sequential(torch.nn.Flatten(), *layers)
        w, _ = train_member(m, x[:4000], y[:4000], x[4000:], y[4000:], Plain(),
                            TrainSettings(lr=0.05, epochs=30, batch_size=64, weight_decay=0.0), seed=seed, progress=False)
        m.load_state_dict(w)
        out.append(m.eval())
    return out


@pytest.fixture(scope="module")
def batch():
    return _synthetic(64, 7)


def _attacks(models):
    m = models[0]
    return {
        "fgsm": lambda: FGSM(m, EPS),
        "bim": lambda: BIM(m, EPS, steps=5),
        "pgd": lambda: PGD(m, EPS, steps=5, seed=3),
        "pgd_margin": lambda: PGD(m, EPS, steps=5, loss="margin", seed=3),
        "apgd": lambda: APGD(m, EPS, steps=12, seed=3),
        "apgd_dlr": lambda: APGD(m, EPS, steps=12, loss="dlr", seed=3),
        "mifgsm": lambda: MIFGSM(m, EPS, steps=5),
        "cwa": lambda: CWA(models, EPS, steps=3),
        "square_linf": lambda: SquareAttack(m, EPS, "linf", n_queries=40, seed=3),
        "square_l2": lambda: SquareAttack(m, 0.5, "l2", n_queries=40, seed=3),
    }


NAMES = ["fgsm", "bim", "pgd", "pgd_margin", "apgd", "apgd_dlr", "mifgsm", "cwa", "square_linf", "square_l2"]


@pytest.mark.parametrize("name", NAMES)
def test_budget_range_no_mutation_and_determinism(models, batch, name):
    x, y = batch
    x0, y0 = x.clone(), y.clone()
    make = _attacks(models)[name]
    x_adv = make()(x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0), "inputs were mutated"
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    delta = (x_adv - x).flatten(1)
    if name == "square_l2":
        assert float(delta.norm(dim=1).max()) <= 0.5 + 1e-5
    else:
        assert float(delta.abs().max()) <= EPS + 1e-6
    assert float(delta.abs().max()) > 0, "the attack did nothing"
    assert torch.equal(make()(x, y), x_adv), "same seed, different adversarial examples"


def test_pgd_drives_robust_accuracy_far_below_clean(models, batch):
    x, y = _synthetic(300, 11)
    clean = accuracy(models[0], x, y)
    robust = accuracy(models[0], PGD(models[0], EPS, steps=10)(x, y), y)
    assert clean > 0.8
    assert robust < 0.5 * clean, (clean, robust)


def test_attacks_do_not_touch_the_global_rng(models, batch):
    x, y = batch
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    PGD(models[0], EPS, steps=2)(x, y)
    SquareAttack(models[0], EPS, n_queries=5)(x, y)
    APGD(models[0], EPS, steps=3)(x, y)
    assert torch.equal(torch.rand(3), expected)


class _Counting(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, x):
        self.rows += x.shape[0]
        return self.model(x)


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5), ("linf", 1e-4)])
def test_square_counts_every_forward_pass_and_respects_the_budget(models, batch, norm, eps):
    x, y = batch
    counted = _Counting(models[0])
    budget = 30
    res = SquareAttack(counted, eps, norm, n_queries=budget, seed=0).run(x, y)
    assert int(res.queries.sum()) == counted.rows  # every image forward pass is one query
    assert int(res.queries.max()) <= budget and int(res.queries.min()) >= 1
    with torch.no_grad():
        wrong = models[0](res.x_adv).argmax(1) != y
    assert torch.equal(wrong, res.success)
    # an image stops at its first success: it never spends the whole budget unless it survived until the end
    assert bool((res.queries[res.success] <= budget).all())
    assert bool((res.queries[~res.success] == budget).all())


def test_square_stops_images_already_misclassified(models, batch):
    x, y = batch
    counted = _Counting(models[0])
    with torch.no_grad():
        flipped = 1 - models[0](x).argmax(1)  # every label wrong: the initial query fools every image
    res = SquareAttack(counted, 1e-4, "linf", n_queries=50).run(x, flipped)
    assert counted.rows == len(x) and bool((res.queries == 1).all())


def test_square_p_schedule_and_stripes():
    assert p_schedule(0.8, 0, 10000) == 0.8
    assert p_schedule(0.8, 11, 10000) == 0.4 and p_schedule(0.8, 51, 10000) == 0.2
    assert p_schedule(0.8, 9000, 10000) == pytest.approx(0.8 / 512)
    assert p_schedule(0.8, 1, 500) == 0.4  # rescaled: 1/500 of the run is iteration 20 of 10,000
    x = torch.full((2, 3, 8, 8), 0.5)
    init = SquareAttack(lambda z: z.flatten(1)[:, :2], 0.1, "linf")._init(x, torch.Generator().manual_seed(0))
    d = init - x
    assert torch.allclose(d.abs(), torch.full_like(d, 0.1))
    assert torch.equal(d, d[:, :, :1, :].expand_as(d))  # vertical stripes: constant down each column


def test_losses():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(margin(logits, y), torch.tensor([-2.0, 2.0]))
    dlr = attack_loss("dlr")
    assert torch.allclose(dlr(logits, y), dlr(10 * logits, y))  # scale invariant
    assert set(LOSSES) == {"ce", "margin", "dlr"}
    with pytest.raises(ValueError):
        attack_loss("hinge")


def test_cwa_step_sizes_are_derived_from_eps():
    cwa = CWA([torch.nn.Identity()], eps=0.04)
    assert cwa.reverse_step == pytest.approx(0.04 / 15) and cwa.outer_step == pytest.approx(0.04 / 5)
    # the official 250 at eps=16/255 on 3x224x224 is recovered exactly
    assert CWA_INNER_RATIO * (16 / 255) * math.sqrt(3 * 224 * 224) == pytest.approx(250.0)


def test_apgd_checkpoints():
    ck = APGD._checkpoints(100)
    assert ck[0] == 0 and ck[1] == 22 and ck == sorted(ck) and ck[-1] <= 100
    gaps = [b - a for a, b in zip(ck[1:], ck[2:])]
    assert all(g >= 6 for g in gaps)  # the window shrinks by 3% down to 6%


# --------------------------------------------------------- the worst case ---

class _Detour(torch.nn.Module):
    """Three logits along t = the mean pixel, label 0: CE rises with t all the way across the ball [0, 1],
    the image is misclassified (class 1 wins) for t in (0.58, 0.95), and classified correctly again near
    t = 1, where CE is highest. An attack that climbs CE passes through the misclassified stretch and ends
    on a correct point, so only the worst case over the evaluated points reports the image as broken."""

    def forward(self, x):
        t = x.flatten(1).mean(1)
        z1 = torch.where(t < 0.6, -3 + 3.1 * t / 0.6, torch.where(t < 0.9, 0.1 + 0 * t, 0.1 - 2 * (t - 0.9)))
        z2 = torch.where(t < 0.6, -5 + 0 * t, torch.where(t < 0.9, -5 + 4.3 * (t - 0.6) / 0.3, -0.7 + 6 * (t - 0.9)))
        return torch.stack([torch.zeros_like(t), z1, z2], 1)


class _Record(torch.nn.Module):
    """Logs every point a model is asked about, with its prediction; calls must hold all images, in order."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n, self.points, self.wrong = model, n, [], []

    def forward(self, x):
        assert len(x) == self.n
        out = self.model(x)
        self.points.append(x.detach().clone())
        self.wrong.append(out.detach().argmax(1) != 0)
        return out


def test_detour_model_is_what_the_worst_case_tests_need():
    t = torch.linspace(0, 1, 1001).view(-1, 1, 1, 1).requires_grad_(True)
    logits = _Detour()(t)
    ce = torch.nn.functional.cross_entropy(logits, torch.zeros(1001, dtype=torch.long), reduction="none")
    (g,) = torch.autograd.grad(ce.sum(), t)
    assert bool((g.flatten() > 0).all()), "CE must rise all the way, so every attack climbs towards t = 1"
    wrong = logits.argmax(1) != 0
    assert bool(wrong[600:900].all()) and not bool(wrong[:550].any()) and not bool(wrong[960:].any())
    assert int(ce.argmax()) == 1000  # the highest CE in the ball is at t = 1, classified correctly


WORST_CASE_ATTACKS = {
    "bim": lambda m: BIM(m, 0.5, steps=10),
    "pgd": lambda m: PGD(m, 0.5, steps=10, seed=0),
    "apgd": lambda m: APGD(m, 0.5, steps=10, seed=0),
    "mifgsm": lambda m: MIFGSM(m, 0.5, steps=10),
}


@pytest.mark.parametrize("name", list(WORST_CASE_ATTACKS))
def test_an_image_broken_on_the_way_is_reported_broken(name):
    """The highest-CE point of the ball is classified correctly, an earlier iterate was not: the attack
    must answer with a misclassified point for every image it saw misclassified, and say so."""
    n = 64
    x, y = torch.full((n, 1, 1, 1), 0.5), torch.zeros(n, dtype=torch.long)
    rec = _Record(_Detour(), n)
    attack = WORST_CASE_ATTACKS[name](rec)
    attack.drop_broken = False  # the record needs every image at every step
    res = attack.run(x, y)
    assert torch.equal(WORST_CASE_ATTACKS[name](_Detour()).run(x, y).success, res.success)
    seen_wrong = torch.stack(rec.wrong).any(0)
    assert int(seen_wrong.sum()) >= n // 4, "the attack never crossed the misclassified stretch: the test says nothing"
    with torch.no_grad():
        answer_wrong = _Detour()(res.x_adv).argmax(1) != y
    assert torch.equal(res.success, seen_wrong)
    assert bool(answer_wrong[seen_wrong].all()), f"{int((seen_wrong & ~answer_wrong).sum())} broken images reported robust"
    assert float((res.x_adv - x).abs().max()) <= 0.5 + 1e-6
    # without the worst case, the answer is the last (or best-loss) iterate: correct again
    plain = WORST_CASE_ATTACKS[name](_Detour())
    plain.worst_case = False
    with torch.no_grad():
        assert not bool((_Detour()(plain(x, y)).argmax(1) != y).any())


def test_square_with_ce_loss_returns_its_first_success():
    """Square keeps a candidate only if it lowers its loss. With the CE loss, a misclassified candidate need
    not: from t = 1 (correct, highest CE), the candidates at t = 0.75 are misclassified but have lower CE.
    The worst case must keep them anyway."""
    n = 32
    x, y = torch.full((n, 1, 2, 2), 0.5), torch.zeros(n, dtype=torch.long)  # t = 0.5: classified correctly
    model = _Detour()
    # eps 0.5: every pixel goes to 0 or 1, so t is a multiple of 1/4; the stripe init gives t in {0, 0.5, 1}
    res = SquareAttack(model, 0.5, "linf", n_queries=30, loss="ce", seed=0).run(x, y)
    with torch.no_grad():
        answer_wrong = model(res.x_adv).argmax(1) != y
    assert bool(res.success.all()) and bool(answer_wrong.all()), f"{int((~answer_wrong).sum())} images left robust"


def _digits_cnn():
    from fedrobust.data import load_dataset, to_float
    from fedrobust.models import build_model

    d = load_dataset("digits")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = build_model("cnn", 1, 10, d.mean, d.std)
    w, _ = train_member(m, d.x_train[:1000], d.y_train[:1000], d.x_train[1000:1200], d.y_train[1000:1200], Plain(),
                        TrainSettings(epochs=5), seed=0, progress=False)
    m.load_state_dict(w)
    return m.eval(), to_float(d.x_test[:60]), d.y_test[:60]


def test_images_found_broken_leave_the_batch_and_nothing_else_changes():
    """BIM, PGD (with a restart), APGD (CE, DLR, L2) and APGD-T stop computing on an image once it is found
    broken: the images still attacked follow the same path as in the whole batch, so every answer and every
    verdict is the same, bit for bit, as with drop_broken=False; and fewer images are computed on."""
    from fedrobust.attacks.gradient import APGDT

    m, x, y = _digits_cnn()
    seen_rows = []

    def counting(z):
        # one image per call: no kernel sees a batch, so no rounding can depend on the batch's size on any CPU,
        # and the comparison tests the attacks alone
        seen_rows.append(len(z))
        return torch.cat([m(z[i : i + 1]) for i in range(len(z))])

    attacks = {
        "bim": lambda f: BIM(f, 0.1, steps=10),
        "pgd": lambda f: PGD(f, 0.1, steps=10, seed=1, restarts=2),
        "apgd": lambda f: APGD(f, 0.1, steps=25, seed=1, restarts=2),
        "apgd_dlr": lambda f: APGD(f, 0.1, steps=25, loss="dlr", seed=1),
        "apgd_l2": lambda f: APGD(f, 0.5, steps=25, seed=1, norm="l2"),
        "apgd_t": lambda f: APGDT(f, 0.1, steps=20, targets=3, seed=1),
    }
    for name, make in attacks.items():
        runs = {}
        for drop in (False, True):
            seen_rows.clear()
            attack = make(counting)
            attack.drop_broken = drop
            runs[drop] = attack.run(x, y), sum(seen_rows)
        (whole, cost_whole), (dropped, cost_dropped) = runs[False], runs[True]
        assert 0 < int(whole.success.sum()) < len(y), f"{name}: every or no image broken, the test says nothing"
        assert torch.equal(whole.success, dropped.success), name
        assert torch.equal(whole.x_adv, dropped.x_adv), name
        assert cost_dropped < cost_whole, name
