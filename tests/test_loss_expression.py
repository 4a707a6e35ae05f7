"""Loss expression trees (AutoLoss-AR, paper 004, Table I): the compiler, the protected operators, the
parser's refusals, and the exact simplifications the fitness cache keys on."""

from __future__ import annotations

import pytest
import torch

from fedrobust.attacks import LOSSES, PGD, SearchedLoss, attack_loss
from fedrobust.attacks.expression import (
    GAMMA, HAND_MADE, MAX_DEPTH, PRIMITIVES, LossExpressionError, depth, infix, parse, simplify, to_text,
)

def neg(x):
    return ("Neg", x)


def add(a, b):
    return ("Add", a, b)


def mul(a, b):
    return ("Mul", a, b)


CE, MARGIN, DLR = HAND_MADE["ce"], HAND_MADE["margin"], HAND_MADE["dlr"]


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(64, 10, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    return logits, y


@pytest.mark.parametrize("tree,name,tol", [(CE, "ce", 2e-3), (MARGIN, "margin", 1e-5), (DLR, "dlr", 1e-4)])
def test_hand_made_losses_written_as_trees_give_the_librarys_values(batch, tree, name, tol):
    logits, y = batch
    ours = SearchedLoss(tree)(logits, y)
    want = LOSSES[name](logits, y)
    assert ours.shape == (64,)
    torch.testing.assert_close(SearchedLoss.parse(to_text(tree))(logits, y), ours)  # the text form too
    if name == "ce":  # the protected log, log(s + gamma), departs from log(s) where s is near gamma
        fair = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1) > 1e-3
        assert 0 < fair.sum() < 64 and (ours <= want + 1e-6).all()
        ours, want = ours[fair], want[fair]
    torch.testing.assert_close(ours, want, rtol=tol, atol=tol)


def test_the_ce_tree_drives_pgd_like_cross_entropy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 5, (32,))
    a = PGD(model, 0.1, 5, loss="ce", seed=1)(x, y)
    b = PGD(model, 0.1, 5, loss=SearchedLoss(CE), seed=1)(x, y)
    assert (a - b).abs().max() < 1e-6


def test_protected_operators_at_zero_and_at_negative_inputs():
    x = torch.tensor([0.0, -4.0, -1e-9, 4.0], requires_grad=True)
    inv, sqrt, log = (PRIMITIVES[n][1] for n in ("Inv", "Sqrt", "Log"))
    for fn in (inv, sqrt, log):
        v = fn(x)
        (g,) = torch.autograd.grad(v.sum(), x)
        assert torch.isfinite(v).all() and torch.isfinite(g).all()
        assert v[0] == 0 and g[0] == 0  # 0 at 0, where sign(0) = 0
        assert torch.allclose(fn(-x.detach()), -fn(x.detach()))  # odd
    torch.testing.assert_close(inv(x)[1], torch.tensor(-1 / (4 + GAMMA)))
    torch.testing.assert_close(sqrt(x)[1], torch.tensor(-((4 + GAMMA) ** 0.5)))
    torch.testing.assert_close(log(x)[1], -torch.log(torch.tensor(4 + GAMMA)))
    # near 0 the gradient is bounded by gamma, not infinite
    assert torch.isfinite(torch.autograd.grad(inv(x).sum(), x)[0]).all()


def test_class_reductions_keep_the_axis_and_the_output_is_summed_per_sample(batch):
    logits, y = batch
    torch.testing.assert_close(SearchedLoss(("Max", "p"))(logits, y), logits.amax(1))
    torch.testing.assert_close(SearchedLoss("p")(logits, y), logits.sum(1))  # eq. 9
    torch.testing.assert_close(SearchedLoss(("Softmax", "p"))(logits, y), torch.ones(64))
    const = SearchedLoss("1")(logits.requires_grad_(True), y)
    assert const.shape == (64,) and (const == 1).all()
    (g,) = torch.autograd.grad(const.sum(), logits)  # a constant loss keeps a (zero) gradient
    assert (g == 0).all()


@pytest.mark.parametrize("text,why", [
    ("Frobnicate(p)", "unknown primitive 'Frobnicate'"),
    ("__import__('os').system('touch x')", "unknown"),
    ("Add(p)", "Add takes 2 argument(s), got 1"),
    ("Neg(p, q)", "Neg takes 1 argument(s), got 2"),
    ("Neg(r)", "unknown terminal 'r'"),
    ("Neg(p))", "unbalanced ')'"),
    ("Neg(p", "unbalanced '('"),
    ("p q", "text after the end"),
    ("", "empty"),
    ("Neg(" * (MAX_DEPTH + 1) + "p" + ")" * (MAX_DEPTH + 1), f"deeper than the limit of {MAX_DEPTH}"),
])
def test_the_parser_refuses_in_one_line(text, why):
    with pytest.raises(LossExpressionError, match=r"^[^\n]*$") as info:
        parse(text)
    assert why in str(info.value)


def test_text_round_trip_and_depth():
    text = to_text(DLR)
    assert parse(text) == DLR
    assert depth("p") == 0 and depth(CE) == 4
    assert infix(CE) == "-(q * log(softmax(p)))"
    deep = "Neg(" * MAX_DEPTH + "p" + ")" * MAX_DEPTH
    assert depth(parse(deep)) == MAX_DEPTH


@pytest.mark.parametrize("a,b", [
    (add("p", "q"), add("q", "p")),
    (neg(neg(CE)), CE),
    (mul("1", CE), CE),
    (add(CE, "0"), CE),
    (("Abs", neg("p")), ("Abs", "p")),
    (("Square", neg("p")), ("Square", "p")),
    (("Max", ("Max", "p")), ("Max", "p")),
    (("Sum", ("Max", "p")), ("Max", "p")),
    (("Exp", "0"), "1"),
])
def test_simplify_maps_equivalent_trees_to_one_text(a, b):
    assert to_text(simplify(a)) == to_text(simplify(b))


def test_simplify_is_exact_where_it_rewrites(batch):
    logits, y = batch
    logits = logits.clone().requires_grad_(True)
    for tree in (neg(neg(CE)), mul("1", add(MARGIN, "0")), ("Sum", ("Max", ("Abs", neg("p"))))):
        before, after = SearchedLoss(tree)(logits, y), SearchedLoss(simplify(tree))(logits, y)
        assert torch.equal(before, after)
        ga = torch.autograd.grad(before.sum(), logits)[0]
        gb = torch.autograd.grad(after.sum(), logits)[0]
        assert torch.equal(ga, gb)


def test_simplify_keeps_rewrites_that_change_a_non_finite_value():
    # Mul(x, 0) is nan, not 0, when x overflows: the two must not share a fitness
    tree = mul(("Exp", ("Exp", ("Exp", ("Exp", "p")))), "0")
    assert simplify(tree) != "0"


def test_file_losses_load_and_registered_names_resolve(tmp_path):
    path = tmp_path / "best.json"
    path.write_text('{"format": "fedrobust-loss/1", "expression": "Neg(Mul(q, Log(Softmax(p))))"}')
    loss = attack_loss(f"file:{path}")
    assert isinstance(loss, SearchedLoss) and loss.tree == CE
    with pytest.raises(ValueError, match="unknown primitive 'Nope'"):
        path.write_text('{"expression": "Nope(p)"}')
        attack_loss(f"file:{path}")
