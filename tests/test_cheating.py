"""Nodes that cheat (issue 42): the simulated behaviours, the ensemble's combination rules, the server's
screening on images of its own, the backdoor figures, and a plug-in behaviour from an installed package.

Unit checks run in this process on hand-made tensors and tiny models. Every run is a digits run of small
MLPs (inline, but one on the simulation engine: a plug-in behaviour must reach its ClientApp), started from a shell (a subprocess, with ``OMP_NUM_THREADS=1``) where the test is
about what a user sees: the exit code, the one line on stderr, the run directory and its results.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedrobust.behaviours import (Backdoor, LabelFlip, Scale, Trigger, build_behaviour,
                                  check_malicious)
from fedrobust.config import load_config
from fedrobust.data import load_dataset
from fedrobust.ensemble import VOTE_TIE_BREAK, Ensemble, combine_logits

ROOT = Path(__file__).resolve().parent.parent
DIGITS = load_dataset("digits")  # 1437 training and 360 test images of 1x8x8, float32 in [0, 1]; 10 classes


# --------------------------------------------------------------------------------------------------------------
# helpers: a command from a shell, a fake installed distribution (as tests/test_plugins.py does)


def _env(*paths: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0")
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def fedrobust(*args: str, cwd: Path, plugins: tuple[Path, ...] = (), timeout: int = 600):
    """``fedrobust ARGS`` from a shell in ``cwd``, with ``plugins`` installed (on the path)."""
    return subprocess.run([sys.executable, "-m", "fedrobust.cli", *args], capture_output=True, text=True,
                          env=_env(*plugins), cwd=cwd, timeout=timeout)


def _distribution(folder: Path, package: str, modules: dict[str, str], entry_points: str, name: str) -> Path:
    """``folder`` as site-packages after ``pip install`` of distribution ``name`` 0.1: ``package`` with
    ``modules`` (name -> source), and its entry points."""
    (folder / package).mkdir(parents=True)
    (folder / package / "__init__.py").write_text("")
    for module, source in modules.items():
        (folder / package / f"{module}.py").write_text(source)
    info = folder / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return folder


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _ok(proc) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("fedrobust: error: ")]


# tiny runs: small MLPs on IID shards
RUN = ["train", "engine=inline", "model=mlp", "deployment=distributed_iid", "train.progress=false",
       "train.batch_size=64"]
# tiny attack settings (tests/test_plugins.py's ATTACK), with three white-box gradient attacks
ATTACK = ["attack.num_samples=40", "attack.queries=10", "attack.surrogates=[mlp]", "attack.surrogate_epochs=1",
          "attack.transfer_attacks=[pgd]", "attack.transfer=pgd", "attack.transfer_steps=2",
          "attack.query_attacks=[square_linf]", "attack.whitebox_steps=2", "attack.apgd_steps=2", "attack.tsr=false",
          "attack.hessian_samples=0", "attack.per_member=false", "attack.batch_size=40", "train.progress=false"]


# --------------------------------------------------------------------------------------------------------------
# 1. each behaviour does what it says


def _tiny_net(bias: bool) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10, bias=bias)).eval()


def _digits_member(model: str) -> nn.Module:
    from fedrobust.node import build_member

    return build_member(load_config([f"model={model}"]), DIGITS, seed=11).eval()


@pytest.mark.parametrize("factor, shift", [(100.0, 1), (3.5, -2), (2.0, 0), (100.0, 13)])
@pytest.mark.parametrize("make", [lambda: _digits_member("cnn"), lambda: _digits_member("mlp"),
                                  lambda: _tiny_net(bias=True), lambda: _tiny_net(bias=False)],
                         ids=["cnn", "mlp", "linear-with-bias", "linear-without-bias"])
def test_scale_multiplies_the_logits_and_rolls_the_classes(make, factor, shift):
    honest = make()
    weights = honest.state_dict()
    before = {k: v.clone() for k, v in weights.items()}
    scale = build_behaviour("scale", {"factor": factor, "shift": shift}, 10)
    assert isinstance(scale, Scale) and scale.trains
    sent = scale.poison_weights(weights)
    assert all(torch.equal(weights[k], before[k]) for k in before)  # the member's own weights are untouched
    changed = {k for k in sent if not torch.equal(sent[k], before[k])}
    last = [k for k in before if k.endswith("weight") and before[k].dim() == 2][-1]  # the classifier's weight
    assert changed <= {last, last[: -len("weight")] + "bias"} and last in changed
    cheat = make()
    cheat.load_state_dict(sent)
    x = DIGITS.x_test[:50]
    with torch.no_grad():
        z, z_cheat = honest(x), cheat(x)
    torch.testing.assert_close(z_cheat, factor * torch.roll(z, shift, dims=1), rtol=1e-5, atol=1e-4)
    # class c's logit is now the cheat's class (c + shift) mod C
    assert torch.equal(z_cheat.argmax(1), (z.argmax(1) + shift) % 10)


@pytest.mark.parametrize("shift", [1, 3, -1, 12])
def test_label_flip_maps_every_label_on_train_and_validation(shift):
    flip = build_behaviour("label_flip", {"shift": shift}, 10)
    assert isinstance(flip, LabelFlip)
    y = torch.arange(30) % 10
    x = torch.rand(30, 1, 8, 8)
    expected = torch.tensor([(int(v) + shift) % 10 for v in y])  # Python's mod: always in 0..9
    for train in (True, False):
        x2, y2 = flip.poison_data(x, y, train=train, seed=0)
        assert torch.equal(y2, expected) and torch.equal(x2, x)
    assert torch.equal(y, torch.arange(30) % 10)  # the input is not changed in place


# (corner, size, margin) -> the patch's rows and columns in an 8x8 image, worked out by hand
BOXES = {
    ("top_left", 2, 1): (slice(1, 3), slice(1, 3)),
    ("bottom_right", 3, 1): (slice(4, 7), slice(4, 7)),
    ("top_right", 2, 0): (slice(0, 2), slice(6, 8)),
    ("bottom_left", 3, 2): (slice(3, 6), slice(2, 5)),
}


@pytest.mark.parametrize("corner, size, margin", list(BOXES))
def test_the_trigger_box_is_where_the_corner_and_margin_put_it(corner, size, margin):
    t = Trigger(size, 1.0, corner, margin)
    assert t.box(8, 8) == BOXES[corner, size, margin]
    assert t.fits(8, 8)
    assert not Trigger(9, 1.0, corner, 0).fits(8, 8) and not Trigger(6, 1.0, corner, 3).fits(8, 8)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("corner, size, margin", list(BOXES))
@pytest.mark.parametrize("n, fraction, k", [(47, 0.3, 14), (47, 0.1, 5), (20, 1.0, 20)])
def test_backdoor_stamps_round_fraction_n_training_images_and_nothing_else(dtype, corner, size, margin, n, fraction, k):
    value, target, seed = 0.6, 3, 1234
    b = build_behaviour("backdoor", {"fraction": fraction, "target": target, "size": size, "value": value,
                                     "corner": corner, "margin": margin}, 10)
    assert isinstance(b, Backdoor)
    g = torch.Generator().manual_seed(0)
    if dtype == torch.uint8:  # pixels below the patch's value, so that every stamped image differs
        x = torch.randint(0, 100, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
        patch = torch.tensor(153, dtype=torch.uint8)  # round(0.6 * 255)
        assert int(patch) == round(value * 255)
    else:
        x = torch.rand((n, 3, 8, 8), generator=g) * 0.5
        patch = torch.tensor(value)
    y = torch.randint(0, 10, (n,), generator=g)
    x0, y0 = x.clone(), y.clone()

    xp, yp = b.poison_data(x, y, train=True, seed=seed)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # copies: the shard's tensors are untouched
    assert xp.dtype == dtype and xp.shape == x.shape
    stamped = [i for i in range(n) if not torch.equal(xp[i], x[i])]
    assert len(stamped) == k == round(fraction * n)
    assert stamped == b.poisoned(n, seed).tolist()
    rows, cols = BOXES[corner, size, margin]
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[rows, cols] = False
    for i in range(n):
        if i in stamped:
            assert (xp[i][:, rows, cols] == patch).all()  # every channel
            assert torch.equal(xp[i][:, outside], x[i][:, outside])
            assert int(yp[i]) == target
        else:
            assert torch.equal(xp[i], x[i]) and int(yp[i]) == int(y[i])
    # the draw depends on the seed, and is the same for the same seed
    assert b.poisoned(n, seed).tolist() == b.poisoned(n, seed).tolist()
    if 0 < k < n:
        assert b.poisoned(n, seed + 1).tolist() != stamped
    # the validation split is left alone
    xv, yv = b.poison_data(x, y, train=False, seed=seed)
    assert torch.equal(xv, x0) and torch.equal(yv, y0)


class _Captured(Exception):
    pass


@pytest.mark.parametrize("name, options", [("label_flip", {"shift": 2}),
                                           ("backdoor", {"fraction": 0.4, "target": 7, "corner": "top_left"})])
def test_a_cheating_node_trains_on_its_poisoned_shard(name, options, monkeypatch):
    """train_node_round hands the trainer the poisoned train split (seeded per node) and validation split."""
    from fedrobust import node
    from fedrobust.training import member_seed

    seen = {}

    def trainer(models, x_tr, y_tr, x_va, y_va, *args, **kwargs):
        seen.update(x_tr=x_tr, y_tr=y_tr, x_va=x_va, y_va=y_va)
        raise _Captured

    monkeypatch.setattr(node, "MemberTrainer", trainer)
    cfg = load_config(["model=mlp", "deployment=distributed_iid", "deployment.num_nodes=3", "train.progress=false"])
    behaviour = build_behaviour(name, options, 10)
    with pytest.raises(_Captured):
        node.train_node_round(cfg, 1, 0, {}, behaviour=behaviour)
    shard = node.shards_for(cfg, DIGITS)[1]
    x_tr, y_tr = DIGITS.x_train[shard.train], DIGITS.y_train[shard.train]
    x_va, y_va = DIGITS.x_train[shard.val], DIGITS.y_train[shard.val]
    if name == "label_flip":
        assert torch.equal(seen["x_tr"], x_tr) and torch.equal(seen["x_va"], x_va)
        assert torch.equal(seen["y_tr"], (y_tr + 2) % 10) and torch.equal(seen["y_va"], (y_va + 2) % 10)
    else:
        want_x, want_y = behaviour.poison_data(x_tr, y_tr, train=True, seed=member_seed(cfg.train.seed, 1))
        assert torch.equal(seen["x_tr"], want_x) and torch.equal(seen["y_tr"], want_y)
        assert int((seen["y_tr"] != y_tr).sum()) > 0
        assert sum(not torch.equal(a, b) for a, b in zip(seen["x_tr"], x_tr)) == round(0.4 * len(shard.train))
        assert torch.equal(seen["x_va"], x_va) and torch.equal(seen["y_va"], y_va)


def test_a_free_rider_sends_its_member_as_initialised_and_trains_no_epoch(tmp_path):
    from fedrobust.cli import main
    from fedrobust.node import build_member
    from fedrobust.training import member_seed

    overrides = ["model=mlp", "deployment=distributed_iid", "deployment.num_nodes=2", "train.epochs=2",
                 "train.batch_size=128", "train.progress=false", "deployment.malicious=[{node:1,behaviour:free_rider}]"]
    run = tmp_path / "run"
    assert main(["train", "engine=inline", *overrides, f"run_dir={run}"]) == 0
    cfg = load_config(overrides)
    for m, free in ((0, False), (1, True)):
        init = build_member(cfg, DIGITS, member_seed(cfg.train.seed, m)).state_dict()
        sent = torch.load(run / "members" / f"member_{m}.pt", weights_only=True)
        assert sent.keys() == init.keys()
        assert all(torch.equal(sent[k], init[k]) for k in init) is free, m
    results = _results(run)
    rows = {r["member"]: r for r in results["members"]}
    assert rows[1]["epochs_trained"] == 0 and rows[1]["simulated_behaviour"] == "free_rider"
    assert rows[0]["epochs_trained"] == 2 and "simulated_behaviour" not in rows[0]
    assert results["malicious"]["simulated"] is True
    assert results["malicious"]["nodes"] == [{"node": 1, "behaviour": "free_rider"}]


# --------------------------------------------------------------------------------------------------------------
# 2. the combination rules, on hand-made member outputs

P1, P2, P3 = [0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.4, 0.1, 0.5]
P4, P5 = [0.2, 0.2, 0.6], [0.25, 0.5, 0.25]


def _members(*probs) -> torch.Tensor:
    """Logits (M, 1, C) whose softmax is exactly each member's probabilities."""
    return torch.tensor(probs, dtype=torch.float64).log()[:, None, :]


def _probs(out: torch.Tensor) -> list[float]:
    return out.exp()[0].tolist()


def test_mean_logits_is_the_mean_of_the_logits():
    logits = torch.tensor([[[1.0, 2.0, 3.0]], [[3.0, 0.0, -3.0]]], dtype=torch.float64)
    assert combine_logits(logits, "mean_logits").tolist() == [[2.0, 1.0, 0.0]]
    assert combine_logits(logits).tolist() == [[2.0, 1.0, 0.0]]  # the default


def test_mean_probs_is_the_log_of_the_mean_probability():
    out = combine_logits(_members(P1, P2), "mean_probs")
    assert _probs(out) == pytest.approx([0.4, 0.4, 0.2], abs=1e-12)


def test_median_probs_odd_and_even_member_counts():
    # 3 members: per-class medians 0.4, 0.2, 0.3 (sum 0.9), normalised
    assert _probs(combine_logits(_members(P1, P2, P3), "median_probs")) == pytest.approx([4 / 9, 2 / 9, 3 / 9], abs=1e-12)
    # 4 members: the mean of the two middle values, (0.2+0.4)/2, (0.2+0.2)/2, (0.3+0.5)/2 = 0.3, 0.2, 0.4
    assert _probs(combine_logits(_members(P1, P2, P3, P4), "median_probs")) == pytest.approx([1 / 3, 2 / 9, 4 / 9],
                                                                                            abs=1e-12)


def test_trimmed_mean_probs_drops_the_highest_and_lowest_per_class():
    # 5 members, trim 1: class 0 keeps 0.2, 0.25, 0.4; class 1 0.2, 0.2, 0.5; class 2 0.25, 0.3, 0.5
    out = combine_logits(_members(P1, P2, P3, P4, P5), "trimmed_mean_probs", trim=1)
    assert _probs(out) == pytest.approx([0.85 / 2.8, 0.9 / 2.8, 1.05 / 2.8], abs=1e-12)
    # trim 0 is the mean of the probabilities
    assert _probs(combine_logits(_members(P1, P2), "trimmed_mean_probs", trim=0)) == pytest.approx([0.4, 0.4, 0.2])
    with pytest.raises(ValueError, match="leaves none"):
        combine_logits(_members(P1, P2, P3, P4, P5), "trimmed_mean_probs", trim=3)


def _vote(votes, mean) -> list[float]:
    lam = VOTE_TIE_BREAK
    return [(v + lam * p) / (1 + lam) for v, p in zip(votes, mean)]


def test_majority_vote_is_the_plurality_class_whatever_the_mean_probability():
    assert VOTE_TIE_BREAK == 1e-3
    # three members vote 0 with little confidence, two vote 2 with nearly all of theirs: the mean probability
    # prefers class 2 (0.594 against 0.206), the vote class 0
    weak, sure_a, sure_b = [0.34, 0.33, 0.33], [1e-6, 0.01, 0.99 - 1e-6], [0.01, 1e-6, 0.99 - 1e-6]
    logits = _members(weak, weak, weak, sure_a, sure_b)
    mean = [(3 * 0.34 + 1e-6 + 0.01) / 5, (3 * 0.33 + 0.01 + 1e-6) / 5, (3 * 0.33 + 2 * (0.99 - 1e-6)) / 5]
    out = combine_logits(logits, "majority_vote")
    assert _probs(out) == pytest.approx(_vote([0.6, 0.0, 0.4], mean), abs=1e-12)
    assert int(out.argmax(-1)) == 0
    assert int(combine_logits(logits, "mean_probs").argmax(-1)) == 2


def test_a_tied_vote_goes_to_the_higher_mean_probability():
    # one vote each for classes 0 and 1; the mean probability of class 1 (0.65) beats class 0's (0.275)
    logits = _members([0.5, 0.4, 0.1], [0.05, 0.9, 0.05])
    out = combine_logits(logits, "majority_vote")
    assert _probs(out) == pytest.approx(_vote([0.5, 0.5, 0.0], [0.275, 0.65, 0.075]), abs=1e-12)
    assert int(out.argmax(-1)) == 1
    # and the other way round, 2-2 between four members
    logits = _members([0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.3, 0.4, 0.3], [0.3, 0.4, 0.3])
    assert int(combine_logits(logits, "majority_vote").argmax(-1)) == 0


def _linear_members(k: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Linear(6, 4) for _ in range(k)]


def test_a_vote_has_a_finite_non_zero_input_gradient():
    ens = Ensemble(_linear_members(3), combine="majority_vote", vectorise=False)
    x = torch.randn(8, 6, requires_grad=True)
    y = torch.arange(8) % 4
    (grad,) = torch.autograd.grad(F.cross_entropy(ens(x), y), x)
    assert torch.isfinite(grad).all()
    assert (grad.abs().sum(1) > 0).all()  # every image gets a direction


@pytest.mark.parametrize("vectorise", [False, True])
@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs", "median_probs", "trimmed_mean_probs", "majority_vote"])
def test_the_ensemble_combines_its_members_by_its_rule(rule, vectorise):
    members = _linear_members(5, seed=1)
    ens = Ensemble(members, combine=rule, trim=1, vectorise=vectorise)
    x = torch.randn(7, 6)
    with torch.no_grad():
        expected = combine_logits(torch.stack([m(x) for m in members]), rule, 1)
        torch.testing.assert_close(ens(x), expected, rtol=1e-5, atol=1e-6)
    if rule != "mean_logits":  # log of probabilities that sum to one
        torch.testing.assert_close(expected.exp().sum(1), torch.ones(7), rtol=1e-5, atol=1e-6)


def test_a_scaled_member_decides_the_logit_mean_but_not_the_median_or_the_vote():
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    honest = 2.0 * F.one_hot(y, 3).double()  # each honest member is right, softmax 0.787 on the true class
    cheat = 100.0 * torch.roll(honest, 1, dims=1)  # Scale(factor=100, shift=1) of the same member
    logits = torch.stack([honest, honest, cheat])
    flipped = (y + 1) % 3
    assert torch.equal(combine_logits(logits, "mean_logits").argmax(1), flipped)
    assert torch.equal(combine_logits(logits, "median_probs").argmax(1), y)
    assert torch.equal(combine_logits(logits, "majority_vote").argmax(1), y)
    five = torch.stack([honest, honest, honest, honest, cheat])
    assert torch.equal(combine_logits(five, "mean_logits").argmax(1), flipped)
    assert torch.equal(combine_logits(five, "trimmed_mean_probs", 1).argmax(1), y)


def test_a_trim_that_leaves_no_member_is_refused():
    with pytest.raises(ValueError, match="trimming 2 from each side leaves none of 3 member"):
        Ensemble(_linear_members(3), combine="trimmed_mean_probs", trim=2)
    Ensemble(_linear_members(3), combine="trimmed_mean_probs", trim=1)  # one is left
    with pytest.raises(ValueError, match="unknown combination rule"):
        Ensemble(_linear_members(3), combine="median_logits")


# --------------------------------------------------------------------------------------------------------------
# 3. screening


class _Scaled(nn.Module):
    """Logits ``scale * x @ W.T`` with W a permutation of the classes (identity: always right)."""

    def __init__(self, scale: float, perm: list[int] | None = None) -> None:
        super().__init__()
        w = torch.eye(10)[perm] if perm is not None else torch.eye(10)
        self.linear = nn.Linear(10, 10, bias=False)
        self.linear.weight.data = scale * w

    def forward(self, x):
        return self.linear(x)


def _server_batch():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(100) % 10
    return F.one_hot(y, 10).float() + 0.1 * torch.rand(100, 10, generator=g), y


def test_screening_rejects_an_outlier_scale_but_never_one_within_twice_the_median():
    from fedrobust.screening import MAD_FLOOR, screen

    assert MAD_FLOOR == pytest.approx(math.log(2) / 5)
    x, y = _server_batch()
    wrong = [(c + 1) % 10 for c in range(10)]  # always wrong, at an honest scale
    models = [_Scaled(1.0), _Scaled(1.0), _Scaled(1.0), _Scaled(1.9), _Scaled(100.0), _Scaled(1.0, wrong)]
    verdicts = screen(models, [0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15], x, y, 0.5, 5.0)
    assert [(v.member, v.node) for v in verdicts] == [(m, 10 + m) for m in range(6)]
    assert [v.accuracy for v in verdicts] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert [v.reason is None for v in verdicts] == [True, True, True, True, False, False]
    assert verdicts[4].reason.startswith("logit scale 100x the median member's")
    assert verdicts[5].reason.startswith("accuracy 0.000 on the server's 100 images, below 0.5 x the median member's 1.000")
    assert verdicts[3].logit_scale == pytest.approx(1.9 * verdicts[0].logit_scale, rel=1e-5)
    # 2.1x is just outside the floor of log(2)/5 scaled MADs x 5
    verdicts = screen([_Scaled(1.0)] * 4 + [_Scaled(2.1)], list(range(5)), list(range(5)), x, y, 0.5, 5.0)
    assert [v.reason is None for v in verdicts] == [True, True, True, True, False]
    assert verdicts[0].as_dict() == {"member": 0, "node": 0, "accuracy": 1.0, "logit_scale": verdicts[0].logit_scale,
                                     "kept": True, "reason": None}


SCREENED = [*RUN, "deployment.num_nodes=5", "train.epochs=8",
            "deployment.malicious=[{node:1,behaviour:scale},{node:3,behaviour:free_rider}]",
            "deployment.server_images=200", "ensemble.screen=true"]


@pytest.fixture(scope="module")
def screened(tmp_path_factory) -> Path:
    """5 nodes, node 1 scales its logits, node 3 rides free; screening on, finishing without the rejected."""
    work = tmp_path_factory.mktemp("screened")
    run = work / "run"
    _ok(fedrobust(*SCREENED, "engine.on_missing=min_members", f"run_dir={run}", cwd=work))
    return run


def test_screening_rejects_the_scaled_and_the_free_riding_member_and_keeps_the_honest(screened):
    from fedrobust.node import build_member
    from fedrobust.training import member_seed

    r = _results(screened)
    s = r["screening"]
    assert s["server_images"] == 200
    assert [(e["member"], e["node"]) for e in s["rejected"]] == [(1, 1), (3, 3)]
    assert all(isinstance(e["reason"], str) and e["reason"] for e in s["rejected"])
    verdicts = {v["member"]: v for v in s["members"]}
    assert sorted(verdicts) == [0, 1, 2, 3, 4]
    for m in (0, 2, 4):
        assert verdicts[m]["kept"] is True and verdicts[m]["reason"] is None
        assert verdicts[m]["accuracy"] > 0.6  # honest members are clearly better than chance
    for m in (1, 3):
        assert verdicts[m]["kept"] is False and verdicts[m]["reason"] == s["rejected"][(m - 1) // 2]["reason"]
        assert verdicts[m]["accuracy"] < 0.5 * float(np.median([v["accuracy"] for v in verdicts.values()]))
    assert verdicts[1]["logit_scale"] > 20 * verdicts[0]["logit_scale"]  # x100
    assert r["ensemble"]["num_members"] == 3
    assert [row["member"] for row in r["members"]] == [0, 2, 4]
    assert sorted(p.name for p in (screened / "members").iterdir()) == ["member_0.pt", "member_2.pt", "member_4.pt"]
    assert sorted(p.name for p in (screened / "rejected").iterdir()) == ["member_1.pt", "member_3.pt"]
    assert r["missing"]["members"] == [1, 3]
    assert [(e["member"], e["node"]) for e in r["missing"]["rejected"]] == [(1, 1), (3, 3)]
    assert r["defence"] == {"combine": "mean_logits", "trim": 1, "screen": True, "min_accuracy": 0.5,
                            "max_scale_mads": 5.0, "server_images": 200}
    assert [(n["node"], n["behaviour"]) for n in r["malicious"]["nodes"]] == [(1, "scale"), (3, "free_rider")]
    assert r["malicious"]["nodes"][0] == {"node": 1, "behaviour": "scale", "factor": 100.0, "shift": 1}
    assert "warnings" in r and "[1, 3]" in r["warnings"][0]
    # the rejected free rider is kept as it was sent: its initialisation
    cfg = load_config(SCREENED[1:])
    init = build_member(cfg, DIGITS, member_seed(cfg.train.seed, 3)).state_dict()
    sent = torch.load(screened / "rejected" / "member_3.pt", weights_only=True)
    assert all(torch.equal(sent[k], init[k]) for k in init)
    assert not (screened / "INCOMPLETE").exists()


def test_a_rejected_member_fails_the_run_by_default_in_one_line(tmp_path):
    run = tmp_path / "run"
    proc = fedrobust(*SCREENED, f"run_dir={run}", cwd=tmp_path)  # engine.on_missing=fail, the default
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "member 1 (node 1) rejected by screening" in errors[0]
    assert "member 3 (node 3) rejected by screening" in errors[0]
    assert "engine.on_missing=min_members" in errors[0]
    assert "Traceback" not in proc.stderr
    assert (run / "INCOMPLETE").is_file() and not (run / "results.json").exists()
    assert not list((run / "members").iterdir())


def test_evaluating_a_screened_run_attributes_robust_accuracies_to_the_kept_members(screened, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(screened, run)
    proc = fedrobust("evaluate", str(run), *ATTACK, "attack.per_member=true", "attack.whitebox=[fgsm]",
                     f"attack.cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    _ok(proc)
    rows = {row["member"]: row for row in _results(run)["members"]}
    assert sorted(rows) == [0, 2, 4]  # no row for a rejected member
    assert all("robust_accuracy" in rows[m] for m in (0, 2, 4))
    # the report says how the members were combined, whom screening rejected and that the cheats were simulated
    proc = fedrobust("report", str(run), cwd=tmp_path)
    _ok(proc)
    report = (run / "report.md").read_text()
    assert "Members combined by `mean_logits`." in report
    assert "Screening on the server's 200 images rejected member 1 (node 1): " in report
    assert "member 3 (node 3): accuracy" in report
    assert "**Simulated** cheating nodes: node 1 (scale), node 3 (free_rider)." in report
    # each row holds its own member's figures: member 4's transfer RA is the one of member_4.pt on its own
    fates = np.load(run / "fates" / "transfer_pgd.npz")
    if "members" in fates:  # per-image fates of each loaded member, in member order (0, 2, 4)
        for k, m in enumerate((0, 2, 4)):
            assert rows[m]["robust_accuracy"]["transfer_pgd"] == pytest.approx(float(fates["members"][k].mean()))


def test_a_trim_that_screening_leaves_too_few_members_for_fails_in_one_line(tmp_path):
    run = tmp_path / "run"
    proc = fedrobust(*SCREENED, "engine.on_missing=min_members", "ensemble.combine=trimmed_mean_probs",
                     "ensemble.trim=2", f"run_dir={run}", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = _error_lines(proc.stderr)
    assert len(errors) == 1 and "ensemble.trim=2" in errors[0] and "after screening" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (run / "results.json").exists()


def test_a_member_with_non_finite_logits_is_rejected_and_left_out_of_the_medians():
    from fedrobust.screening import screen

    x, y = _server_batch()
    broken = _Scaled(1.0)
    broken.linear.weight.data[0, 1] = float("inf")  # finite everywhere else; inf * x gives inf, then NaN stds
    models = [_Scaled(1.0), _Scaled(1.0), _Scaled(1.9), _Scaled(100.0), broken]
    verdicts = screen(models, list(range(5)), list(range(5)), x, y, 0.5, 5.0)
    assert [v.reason is None for v in verdicts] == [True, True, True, False, False]
    assert "non-finite logits" in verdicts[4].reason
    # the medians were taken without the broken member: the others' verdicts are those of screening them alone
    alone = screen(models[:4], list(range(4)), list(range(4)), x, y, 0.5, 5.0)
    assert [v.reason for v in verdicts[:4]] == [v.reason for v in alone]


# --------------------------------------------------------------------------------------------------------------
# 4. the server's images


def _old_node_shards(labels: np.ndarray, deployment: str, n: int, alpha: float, seed: int, val_fraction: float):
    """node_shards as it was before server images (commit f7f0cbf): every training image goes to a node."""
    from fedrobust.partition import partition_indices

    out = []
    for node, idx in enumerate(partition_indices(labels, deployment, n, alpha, seed)):
        perm = np.random.default_rng([seed, node]).permutation(idx)
        n_val = min(len(idx) - 1, max(1, int(round(val_fraction * len(idx)))))
        out.append((np.sort(perm[n_val:]), np.sort(perm[:n_val])))
    return out


@pytest.mark.parametrize("deployment", ["distributed_iid", "distributed_dirichlet"])
def test_the_server_images_are_training_images_no_node_holds(deployment):
    from fedrobust.node import shards_for
    from fedrobust.partition import node_shards, server_indices
    from fedrobust.runs.images import evaluation_images
    from fedrobust.screening import server_images

    cfg = load_config([f"deployment={deployment}", "deployment.num_nodes=5", "deployment.server_images=200"])
    n_train = len(DIGITS.y_train)
    idx, x, y = server_images(cfg, DIGITS)
    assert len(idx) == len(np.unique(idx)) == 200 and np.array_equal(idx, np.sort(idx))
    assert idx.min() >= 0 and idx.max() < n_train  # indices into the training split
    assert np.array_equal(idx, server_indices(n_train, 200, cfg.deployment.partition_seed))
    assert torch.equal(x, DIGITS.x_train[idx]) and torch.equal(y, DIGITS.y_train[idx])
    shards = shards_for(cfg, DIGITS)
    assert len(shards) == 5
    held = set(idx.tolist())
    for s in shards:
        assert not held & set(s.train.tolist()) and not held & set(s.val.tolist()), s.node
    every = np.concatenate([idx] + [np.concatenate([s.train, s.val]) for s in shards])
    assert len(every) == n_train and np.array_equal(np.sort(every), np.arange(n_train))  # disjoint, and cover it
    assert evaluation_images(cfg, DIGITS).split == "test"  # the evaluation sample is another split
    # without server images, the shards are those of before the feature
    labels = DIGITS.y_train.numpy()
    old = _old_node_shards(labels, deployment, 5, cfg.deployment.alpha, 123, 0.2)
    for shards in (node_shards(labels, deployment, 5, cfg.deployment.alpha, 123, 0.2),
                   node_shards(labels, deployment, 5, cfg.deployment.alpha, 123, 0.2, server_images=0),
                   shards_for(load_config([f"deployment={deployment}", "deployment.num_nodes=5"]), DIGITS)):
        assert len(shards) == 5
        for s, (train, val) in zip(shards, old):
            assert np.array_equal(s.train, train) and np.array_equal(s.val, val)


# --------------------------------------------------------------------------------------------------------------
# 5. bad input: exit 2, one line, nothing written

BAD = {
    "unknown behaviour": ("deployment.malicious=[{node:0,behaviour:sign_flip}]",
                          "deployment.malicious[0].behaviour: unknown behaviour 'sign_flip'"),
    "node out of range": ("deployment.malicious=[{node:3,behaviour:scale}]",
                          "deployment.malicious[0].node: node 3 is outside this deployment's nodes 0..2"),
    "negative node": ("deployment.malicious=[{node:-1,behaviour:scale}]", "deployment.malicious[0].node: node -1"),
    "more malicious nodes than nodes": (
        "deployment.malicious=[{node:0,behaviour:scale},{node:1,behaviour:scale},{node:2,behaviour:scale},"
        "{node:0,behaviour:free_rider}]", "deployment.malicious: 4 malicious node(s) but the deployment has 3 node(s)"),
    "a node named twice": ("deployment.malicious=[{node:1,behaviour:scale},{node:1,behaviour:free_rider}]",
                           "deployment.malicious[1].node: node 1 is named twice"),
    "trigger larger than the image": ("deployment.malicious=[{node:0,behaviour:backdoor,size:9}]",
                                      "the trigger (9x9 at margin 1) lies outside the 8x8 image"),
    "trigger pushed out by its margin": ("deployment.malicious=[{node:0,behaviour:backdoor,size:6,margin:3}]",
                                         "the trigger (6x6 at margin 3) lies outside the 8x8 image"),
    "backdoor target outside the classes": ("deployment.malicious=[{node:0,behaviour:backdoor,target:10}]",
                                            "deployment.malicious[0].target: class 10 is outside 0..9"),
    "unknown corner": ("deployment.malicious=[{node:0,behaviour:backdoor,corner:middle}]",
                       "deployment.malicious[0].corner: unknown corner 'middle'"),
    "unknown key": ("deployment.malicious=[{node:0,behaviour:scale,gamma:2}]",
                    "deployment.malicious[0].gamma: unknown key for behaviour 'scale'"),
    "wrong type": ("deployment.malicious=[{node:0,behaviour:label_flip,shift:abc}]",
                   "deployment.malicious[0].shift: expected int"),
    "no node": ("deployment.malicious=[{behaviour:scale}]", "deployment.malicious[0].node: required"),
    "screen without server images": ("ensemble.screen=true", "ensemble.screen: screening needs images of the server's"),
}


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))
            if "fedrobust-cache" not in p.parts}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_malicious_entries_are_one_line_exit_2_and_write_nothing(name, tmp_path, capsys):
    from fedrobust.cli import main

    override, needle = BAD[name]
    run = tmp_path / "run"
    before = _snapshot(tmp_path)
    capsys.readouterr()
    assert main(["train", "engine=inline", "train.progress=false", override, f"run_dir={run}"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedrobust: error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert not run.exists() and _snapshot(tmp_path) == before


def test_check_malicious_knows_the_data_only_when_told():
    entries = [{"node": 0, "behaviour": "backdoor", "target": 12, "size": 9}]
    check_malicious(entries, 3)  # without the data's classes and image size, nothing to say
    with pytest.raises(ValueError, match=r"^deployment\.malicious\[0\]\.target: class 12 is outside 0\.\.9$"):
        check_malicious(entries, 3, 10, (8, 8))
    with pytest.raises(ValueError, match="lies outside the 8x8 image"):
        check_malicious([{"node": 0, "behaviour": "backdoor", "size": 9}], 3, 10, (8, 8))
    check_malicious([{"node": 0, "behaviour": "backdoor", "size": 9}], 3, 10, (28, 28))  # fits MNIST


# --------------------------------------------------------------------------------------------------------------
# 6. a plug-in behaviour from an installed package

CHEAT = '''
"""A node that sends its member with every floating weight multiplied by ``keep``."""

from __future__ import annotations

from dataclasses import dataclass

from fedrobust.behaviours import Behaviour


@dataclass
class ZeroOutConfig:
    keep: float = 0.0  # every floating weight is multiplied by this


class ZeroOut(Behaviour):
    name = "zero_out"
    Config = ZeroOutConfig

    def poison_weights(self, weights):
        return {k: (v * self.config.keep if v.is_floating_point() else v) for k, v in weights.items()}
'''

ZERO_OUT = [*RUN, "deployment.num_nodes=2", "train.epochs=1", "deployment.malicious=[{node:0,behaviour:zero_out}]"]


@pytest.fixture(scope="module")
def cheatplug(tmp_path_factory) -> Path:
    return _distribution(tmp_path_factory.mktemp("cheatplug") / "site", "fedrobust_cheatplug", {"cheat": CHEAT},
                         "[fedrobust.behaviours]\nzero_out = fedrobust_cheatplug.cheat:ZeroOut\n", "fedrobust-cheatplug")


def _check_zeroed(run: Path) -> None:
    zero = torch.load(run / "members" / "member_0.pt", weights_only=True)
    honest = torch.load(run / "members" / "member_1.pt", weights_only=True)
    floating = [k for k, v in zero.items() if v.is_floating_point()]
    assert floating and all(bool((zero[k] == 0).all()) for k in floating)
    assert any(bool((honest[k] != 0).any()) for k in floating)
    r = _results(run)
    assert r["malicious"]["simulated"] is True
    assert r["malicious"]["nodes"] == [{"node": 0, "behaviour": "zero_out", "keep": 0.0}]
    rows = {row["member"]: row for row in r["members"]}
    assert rows[0]["simulated_behaviour"] == "zero_out" and "simulated_behaviour" not in rows[1]


def test_a_plugin_behaviour_runs_from_the_shell(cheatplug, tmp_path):
    run = tmp_path / "run"
    _ok(fedrobust(*ZERO_OUT, f"run_dir={run}", cwd=tmp_path, plugins=(cheatplug,)))
    _check_zeroed(run)


def test_a_plugin_behaviour_is_unknown_without_its_package_and_its_keys_are_typed(cheatplug, tmp_path):
    run = tmp_path / "run"
    for plugins, override, needle in [
        ((), "deployment.malicious=[{node:0,behaviour:zero_out}]",
         "deployment.malicious[0].behaviour: unknown behaviour 'zero_out'"),
        ((cheatplug,), "deployment.malicious=[{node:0,behaviour:zero_out,keep:abc}]",
         "deployment.malicious[0].keep: expected float, got 'abc'"),
    ]:
        proc = fedrobust(*ZERO_OUT[:-1], override, f"run_dir={run}", cwd=tmp_path, plugins=plugins)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("fedrobust: error: "), proc.stderr[-2000:]
        assert needle in lines[0], lines[0]
        assert not run.exists()


def test_a_plugin_behaviour_runs_on_the_simulation_engine(cheatplug, tmp_path):
    run = tmp_path / "run"
    overrides = [o for o in ZERO_OUT if o != "engine=inline"]
    _ok(fedrobust(*overrides, "engine=simulation", f"run_dir={run}", cwd=tmp_path, plugins=(cheatplug,)))
    _check_zeroed(run)


# --------------------------------------------------------------------------------------------------------------
# 7. the backdoor's figures

BACKDOORED = [*RUN, "deployment.num_nodes=3", "train.epochs=10",
              "deployment.malicious=[{node:2,behaviour:backdoor,fraction:0.3,target:7}]"]


def test_the_backdoor_node_s_member_obeys_the_trigger_and_results_say_so(tmp_path):
    from fedrobust.node import build_member
    from fedrobust.stats import interval_of

    run = tmp_path / "run"
    _ok(fedrobust(*BACKDOORED, f"run_dir={run}", cwd=tmp_path))
    r = _results(run)
    (b,) = r["backdoor"]
    non_target = DIGITS.y_test != 7
    assert b["node"] == 2 and b["target"] == 7
    assert b["trigger"] == {"size": 3, "value": 1.0, "corner": "bottom_right", "margin": 1}
    assert b["num_images"] == int(non_target.sum())
    rates = {int(m): v for m, v in b["members"].items()}
    assert sorted(rates) == [0, 1, 2]
    assert rates[2] >= 0.6 and rates[2] > max(rates[0], rates[1]) + 0.4, rates
    assert max(rates[0], rates[1]) <= 0.2, rates
    asr, ci = b["attack_success_rate"], b["interval"]
    assert 0.0 <= asr <= 1.0 and ci[0] <= asr <= ci[1]
    assert ci == pytest.approx(interval_of(asr, b["num_images"]))
    assert r["malicious"]["nodes"] == [{"node": 2, "behaviour": "backdoor", "fraction": 0.3, "target": 7, "size": 3,
                                        "value": 1.0, "corner": "bottom_right", "margin": 1}]
    assert r["members"][2]["simulated_behaviour"] == "backdoor"
    # the member's rate, measured here by hand: the patch stamped on the test images of other classes
    cfg = load_config(BACKDOORED[1:])
    model = build_member(cfg, DIGITS)
    model.load_state_dict(torch.load(run / "members" / "member_2.pt", weights_only=True))
    x = DIGITS.x_test[non_target].clone()
    x[:, :, 4:7, 4:7] = 1.0
    with torch.no_grad():
        hand = float((model.eval()(x).argmax(1) == 7).double().mean())
    assert rates[2] == pytest.approx(hand, abs=1e-6)


# --------------------------------------------------------------------------------------------------------------
# 8. every attack runs against the robust rules


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tiny")
    run = work / "run"
    _ok(fedrobust(*RUN, "deployment.num_nodes=2", "train.epochs=2", "train.batch_size=256", f"run_dir={run}", cwd=work))
    return run


def test_every_attack_runs_against_the_median_and_the_vote_under_keys_of_their_own(tiny, tmp_path):
    from fedrobust.cli import _load_run
    from fedrobust.evaluation.evaluate import _evaluation_key
    from fedrobust.runs.images import evaluation_images

    attacks = [*ATTACK, "attack.whitebox=[fgsm,pgd,apgd]", f"attack.cache_dir={tmp_path / 'cache'}"]
    keys = {}
    for rule in ("median_probs", "majority_vote"):
        run = tmp_path / rule
        shutil.copytree(tiny, run)
        _ok(fedrobust("evaluate", str(run), f"ensemble.combine={rule}", *attacks, cwd=tmp_path))
        r = _results(run)
        got = r["ensemble"]["attacks"]
        assert set(got) == {"transfer_pgd", "query_square_linf", "whitebox_fgsm", "whitebox_pgd", "whitebox_apgd"}
        for name, a in got.items():
            assert math.isfinite(a["robust_accuracy"]) and 0.0 <= a["robust_accuracy"] <= 1.0, (rule, name, a)
        assert all(math.isfinite(v) for v in r["ensemble"]["robust_accuracy"].values())
        assert math.isfinite(r["ensemble"]["clean_accuracy_sample"])
        # the rule is recorded, and the clean accuracy on the whole test set is the rule's, not training's
        assert r["evaluation"]["combine"] == r["ensemble"]["combine"] == r["defence"]["combine"] == rule
        from fedrobust.runs.members import load_ensemble
        from fedrobust.training import evaluate_model

        cfg = _load_run(run, [f"ensemble.combine={rule}"])
        with torch.no_grad():
            want = evaluate_model(load_ensemble(run, "cpu", cfg), DIGITS.x_test, DIGITS.y_test)[1]
        assert r["ensemble"]["clean_accuracy"] == pytest.approx(want, abs=1e-6)  # one image is 1/360
        keys[rule] = r["evaluation"]["key"]
    assert keys["median_probs"] != keys["majority_vote"]
    # the key is the one the rule gives, and every rule gives its own (so none is reused for another)
    data = DIGITS
    computed = {}
    for rule in ("mean_logits", "mean_probs", "median_probs", "trimmed_mean_probs", "majority_vote"):
        trim = ["ensemble.trim=0"] if rule == "trimmed_mean_probs" else []
        cfg = _load_run(tiny, [f"ensemble.combine={rule}", *trim, *attacks])
        computed[rule] = _evaluation_key(tiny, cfg, evaluation_images(cfg, data))
    assert len(set(computed.values())) == 5
    assert computed["median_probs"] == keys["median_probs"] and computed["majority_vote"] == keys["majority_vote"]


def test_a_deployed_run_refuses_cheating_nodes_before_it_writes_anything(tmp_path):
    from flwr.app import Context, RecordDict

    from fedrobust.errors import ConfigError
    from fedrobust.server_app import main

    run = tmp_path / "run"
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config={"overrides": "'deployment.malicious=[{node:1,behaviour:scale}]'", "run-dir": str(run)})
    with pytest.raises(ConfigError, match="deployment.malicious: cheating nodes are simulated"):
        main(None, ctx)
    assert not run.exists()


@pytest.mark.parametrize("deployment", ["centralized", "deep_ensemble", "distributed_iid"])
def test_the_trim_is_checked_against_the_members_every_deployment_trains(deployment):
    from fedrobust.errors import ConfigError

    load_config([f"deployment={deployment}", "deployment.num_nodes=3", "ensemble.combine=trimmed_mean_probs"])
    with pytest.raises(ConfigError, match="leaves none of the 2 member"):
        load_config([f"deployment={deployment}", "deployment.num_nodes=2", "ensemble.combine=trimmed_mean_probs"])
