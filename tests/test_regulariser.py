"""The first-order form of the regularisers' weight gradient against double backpropagation.

Float32, train-mode batch norm, the digits CNN and ResNet-18 on 3x32x32
inputs, at initialisation and after a few training steps: the ``fd`` weight
gradient of the whole loss against the ``exact`` one, and of the penalty
alone (the whole loss's gradient is mostly cross-entropy's when beta is
0.01, so the penalty's own part is checked too).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedrobust.models import build_model
from strategies import EDLCM, Curvature, Dispersion, Plain
from strategies.pattern import ActivationPattern, record, replay
from strategies.regulariser import fd_step_size

MODELS = {"cnn": (1, 8, 32), "resnet18": (3, 32, 4)}  # channels, side, batch


def _members(name, k, trained, dtype=torch.float32, seed=0):
    c, side, n = MODELS[name]
    torch.manual_seed(seed)
    members = [build_model(name, c, 10, (0.5,) * c, (0.25,) * c).to(dtype).train() for _ in range(k)]
    g = torch.Generator().manual_seed(seed)
    for m in members:  # a few plain steps away from initialisation
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        for _ in range(trained):
            xb = torch.rand(n, c, side, side, generator=g, dtype=dtype)
            opt.zero_grad()
            Plain().loss(m, xb, torch.randint(0, 10, (n,), generator=g)).total.backward()
            opt.step()
    x = torch.rand(n, c, side, side, generator=g, dtype=dtype)
    return members, x, torch.randint(0, 10, (n,), generator=g)


def _grad(strategy, members, x, y, peers=()):
    """Weight gradient of the strategy's loss; the members' state (running statistics too) is restored."""
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    params = [p for m in members for p in m.parameters()]
    if len(members) > 1:
        out = strategy.joint_loss(members, x, y)[0]
    else:
        out = strategy.loss(members[0], x, y, peers=peers)
    grads = torch.autograd.grad(out.total, params)
    for m, s in zip(members, saved):
        m.load_state_dict(s)
    return torch.cat([g.flatten() for g in grads]).double(), out


def _agreement(a, b):
    return float(F.cosine_similarity(a, b, dim=0)), float((a - b).norm() / b.norm())


CASES = {  # name: (strategy class, members, frozen peers)
    "curvature": (Curvature, 1, 0),
    "dispersion federated": (Dispersion, 1, 2),
    "dispersion joint": (Dispersion, 3, 0),
    "edlcm joint": (EDLCM, 3, 0),
}


@pytest.mark.parametrize("trained", [0, 3], ids=["init", "trained"])
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("case", list(CASES))
def test_fd_weight_gradient_matches_double_backpropagation(case, model, trained):
    cls, k, n_peers = CASES[case]
    if model == "resnet18" and k > 1:
        k = 2  # a joint pair is enough on the large model
    members, x, y = _members(model, k, trained)
    c = MODELS[model][0]
    peers = [build_model(model, c, 10, (0.5,) * c, (0.25,) * c).eval() for _ in range(n_peers)]
    # the gradient forms unclipped: the bound (tested below) would hide their error on ResNet-18
    fd, out_fd = _grad(cls(grad="fd", clip_grad_norm=None), members, x, y, peers)
    exact, out_exact = _grad(cls(grad="exact", clip_grad_norm=None), members, x, y, peers)
    cos, rel = _agreement(fd, exact)
    assert cos >= 0.999 and rel <= 0.02, f"{case} {model} trained={trained}: cosine {cos:.6f}, relative error {rel:.4f}"
    # the loss's value is the objective, and the logged terms are the same in both forms
    assert float(out_fd.total.detach()) == pytest.approx(float(out_exact.total.detach()), rel=1e-5)
    assert out_fd.terms == pytest.approx(out_exact.terms, rel=1e-4)
    # the penalty's own part (cross-entropy's removed): with beta = 0.01 it is a small part of the whole
    ce = torch.cat([_grad(Plain(), [m], x, y)[0] for m in members])
    cos, rel = _agreement(fd - ce, exact - ce)
    assert cos >= 0.999 and rel <= 0.03, f"{case} {model} penalty only: cosine {cos:.6f}, relative error {rel:.4f}"


def test_fd_error_falls_with_the_step_in_float64():
    members, x, y = _members("cnn", 1, 3, dtype=torch.float64)
    exact, _ = _grad(Curvature(grad="exact", clip_grad_norm=None), members, x, y)
    ce, _ = _grad(Plain(), members, x, y)
    errors = []
    for step in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        fd, _ = _grad(Curvature(grad="fd", fd_step=step, clip_grad_norm=None), members, x, y)
        errors.append(_agreement(fd - ce, exact - ce)[1])
    # first order: a tenth of the step, about a tenth of the error
    assert all(b < 0.2 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4, errors


def test_without_the_recorded_pattern_relu_crossings_ruin_the_difference(monkeypatch):
    """Why the displaced passes replay the activation pattern: without it the difference is noise."""
    members, x, y = _members("cnn", 1, 0)
    exact, _ = _grad(Curvature(grad="exact"), members, x, y)
    ce, _ = _grad(Plain(), members, x, y)
    # the displaced passes with their own pattern
    monkeypatch.setattr("strategies.regulariser.replay", lambda pattern: record(ActivationPattern()))
    fd, _ = _grad(Curvature(grad="fd"), members, x, y)
    assert _agreement(fd - ce, exact - ce)[1] > 0.5


def test_extra_passes_leave_batch_norm_running_statistics_alone():
    for strategy in (Curvature(), EDLCM(), Curvature(grad="exact")):
        members, x, y = _members("cnn", 1, 0)
        reference, _, _ = _members("cnn", 1, 0)
        out = strategy.loss(members[0], x, y)
        out.total.backward()
        reference[0](x)  # the one forward pass plain training makes
        for (name, a), b in zip(members[0].state_dict().items(), reference[0].state_dict().values()):
            if "running" in name or "num_batches" in name:
                assert torch.equal(a, b), (strategy.grad, name)


def test_fd_step_moves_the_most_displaced_sample_by_the_step():
    u = torch.zeros(4, 1, 8, 8)
    u[1] = 3.0
    u[2] = 1.0
    eps = fd_step_size(u, 1e-4)
    rms = (eps * u).flatten(1).norm(dim=1) / 8
    assert float(rms.max()) == pytest.approx(1e-4) and float(rms[2]) == pytest.approx(1e-4 / 3)
    assert fd_step_size(torch.zeros(2, 3)) == 0.0
    assert math.isnan(fd_step_size(torch.tensor([[1.0, float("nan")]]))) and math.isnan(fd_step_size(u * float("inf")))
    assert fd_step_size(u) == pytest.approx((torch.finfo(torch.float32).eps ** 0.5 / 3) / 3)
    ratio = (torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps) ** 0.5  # sqrt(machine eps) scaling
    assert fd_step_size(u.double()) == pytest.approx(fd_step_size(u) * ratio)


class _Clamped(nn.Module):
    """ReLU6, a functional ReLU, max-pooling and batch norm: every kind of recorded switch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU6(inplace=True)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.fc = nn.Linear(6 * 16, 10)

    def forward(self, x):
        z = self.pool(self.act(self.bn(self.conv(x)) * 4))  # scaled so that some units reach 6
        return self.fc(torch.relu(z.flatten(1) - 1))


def test_pattern_replay_reproduces_the_recorded_pass_and_linearises_around_it():
    torch.manual_seed(0)
    model = _Clamped().train()
    x = torch.rand(16, 1, 8, 8)
    pattern = ActivationPattern()
    with record(pattern):
        out = model(x)
    assert {e[0] for e in pattern.entries} == {"relu", "clamp", "maxpool"}
    with replay(pattern):
        again = model(x)
    assert torch.equal(out, again)
    # far from x the switches differ: the replayed pass is not the model's own
    with replay(pattern):
        far = model(x + 0.5)
    assert not torch.allclose(far, model(x + 0.5))
    with pytest.raises(RuntimeError, match="differs from the recorded one"), replay(pattern):
        model(x[:8])


def test_fd_matches_exact_through_relu6_and_max_pooling():
    torch.manual_seed(1)
    model = _Clamped().train()
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    exact, _ = _grad(Curvature(grad="exact"), [model], x, y)
    ce, _ = _grad(Plain(), [model], x, y)
    fd, _ = _grad(Curvature(grad="fd"), [model], x, y)
    cos, rel = _agreement(fd - ce, exact - ce)
    assert cos >= 0.999 and rel <= 0.03, (cos, rel)


@pytest.mark.parametrize("grad", ["fd", "exact"])
def test_clip_grad_norm_scales_the_whole_gradient_down_to_the_bound(grad):
    """ResNet-18 at initialisation: the weight gradient is long (norm ~100), and the bound scales it, direction kept."""
    members, x, y = _members("resnet18", 1, 0)
    free, out_free = _grad(Curvature(grad=grad, clip_grad_norm=None), members, x, y)
    clipped, out_clipped = _grad(Curvature(grad=grad, clip_grad_norm=2.0), members, x, y)
    assert float(free.norm()) > 2.0
    assert float(clipped.norm()) == pytest.approx(2.0, rel=1e-4)
    assert torch.allclose(clipped, free * (2.0 / free.norm()), rtol=1e-4, atol=1e-9)
    # the loss's value and the logged terms are the objective's, unclipped
    assert float(out_clipped.total.detach()) == pytest.approx(float(out_free.total.detach()), rel=1e-6)
    assert out_clipped.terms == pytest.approx(out_free.terms, rel=1e-6)
    # a bound above the gradient's norm changes nothing
    loose, _ = _grad(Curvature(grad=grad, clip_grad_norm=1e9), members, x, y)
    assert torch.allclose(loose, free, rtol=1e-6, atol=1e-12)


def test_clip_grad_norm_is_off_without_a_penalty_and_refuses_non_positive_bounds():
    members, x, y = _members("resnet18", 1, 0)
    plain, _ = _grad(Plain(), members, x, y)
    assert float(plain.norm()) > 0.1
    zero, _ = _grad(Curvature(alpha=0.0, clip_grad_norm=0.1), members, x, y)
    assert torch.equal(zero, plain)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="clip"):
            Curvature(clip_grad_norm=bad)
