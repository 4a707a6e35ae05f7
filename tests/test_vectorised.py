"""The GPU fast path, checked on CPU: the vectorised ensemble, mixed precision, device-side augmentation.

The vectorised ensemble must give the loop's logits (to float32 round-off) for
every model of the zoo and 1, 3 and 7 members, the attacks must craft the
same adversarial examples through either path, and a mixed-architecture zoo
must take the loop. Tests marked ``cuda`` run only where a CUDA device is
present (they are skipped on CPU, and say so).
"""

from __future__ import annotations

import io

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fedrobust.attacks import APGD, FGSM, MIFGSM, PGD, SquareAttack
from fedrobust.ensemble import LogitAverageEnsemble
from fedrobust.models import MODEL_BUILDERS, build_model
from fedrobust.training import MemberTrainer, TrainSettings, train_member
from strategies import build_strategy
from strategies.plain import Plain

def cuda(test):
    """Marked ``cuda`` (``pytest -m cuda`` runs only these) and skipped where no CUDA device is present."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))

# Every CIFAR variant ends in global average pooling, so 16x16 inputs keep the test fast.
SHAPES = {"cnn": (1, 8, 8), "mlp": (1, 8, 8), "resnet8": (1, 8, 8), "vgg7": (1, 8, 8)}


def _members(name: str, k: int, shape=None, seed: int = 0) -> list[nn.Module]:
    """``k`` members with distinct weights and distinct, non-trivial batch-norm statistics."""
    c, h, w = shape or SHAPES.get(name, (3, 16, 16))
    out = []
    for i in range(k):
        torch.manual_seed(seed + i)
        m = build_model(name, c, 10, [0.4] * c, [0.3] * c)
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.data.uniform_(0.5, 1.5)
                mod.bias.data.uniform_(-0.2, 0.2)
        out.append(m.eval())
    return out


def _pair(members):
    return LogitAverageEnsemble(members, vectorise=False), LogitAverageEnsemble(members, vectorise=True)


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
def test_vectorised_logits_equal_the_loop(name, k):
    members = _members(name, k)
    loop, vec = _pair(members)
    assert vec.vectorised and not loop.vectorised
    c, h, w = SHAPES.get(name, (3, 16, 16))
    x = torch.rand(6, c, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = loop(x), vec(x)
    assert a.shape == b.shape == (6, 10)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), f"{name} x{k}: max |diff| {float((a - b).abs().max()):.2e}"


def test_vectorised_input_gradients_and_member_gradients_equal_the_loop():
    members = _members("cnn", 3)
    loop, vec = _pair(members)
    x = torch.rand(8, 1, 8, 8)
    y = torch.arange(8) % 10
    grads = []
    for ens in (loop, vec):
        xg = x.clone().requires_grad_(True)
        for p in ens.parameters():
            p.grad = None
        nn.functional.cross_entropy(ens(xg), y).backward()
        grads.append((xg.grad.clone(), [p.grad.clone() for p in ens.parameters()]))
    (gx_a, gp_a), (gx_b, gp_b) = grads
    assert torch.allclose(gx_a, gx_b, rtol=1e-5, atol=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(gp_a, gp_b))  # gradients reach the members


def test_the_vectorised_ensemble_is_still_a_module_of_its_members():
    members = _members("cnn", 3)
    vec = LogitAverageEnsemble(members, vectorise=True)
    assert isinstance(vec.members, nn.ModuleList) and not vec.training
    assert list(vec.state_dict()) == list(LogitAverageEnsemble(members, vectorise=False).state_dict())
    with pytest.raises(RuntimeError):
        vec.train()
    # a member changed in place is seen at the next call (no stale stacked copy)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        before = vec(x)
        members[0][1].classifier.bias.data += 5.0
        after = vec(x)
        assert torch.allclose(after - before, torch.full_like(before, 5.0 / 3), atol=1e-5)
    # .to() and a checkpoint round trip keep it working
    vec = vec.to(torch.float64).to(torch.float32)
    buf = io.BytesIO()
    torch.save(vec.state_dict(), buf)
    buf.seek(0)
    fresh = LogitAverageEnsemble(_members("cnn", 3, seed=10), vectorise=True)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.allclose(fresh(x), vec(x), atol=1e-6)


def test_auto_takes_the_loop_on_cpu_and_a_mixed_zoo_always_takes_it():
    assert not LogitAverageEnsemble(_members("cnn", 3)).vectorised  # auto, on CPU
    zoo = [*_members("cnn", 1), *_members("resnet8", 1), *_members("mlp", 1)]
    ens = LogitAverageEnsemble(zoo, vectorise=True)
    assert not ens.vectorised
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(ens(x), sum(m(x) for m in zoo) / 3, atol=1e-6)
    with pytest.raises(ValueError, match="vectorise"):
        LogitAverageEnsemble(zoo, vectorise="yes")


ATTACKS = {
    "fgsm": lambda m: FGSM(m, eps=0.1),
    "pgd": lambda m: PGD(m, eps=0.1, steps=10, seed=0),
    "mifgsm": lambda m: MIFGSM(m, eps=0.1, steps=10),
    "apgd": lambda m: APGD(m, eps=0.1, steps=10, seed=0),
    "square_linf": lambda m: SquareAttack(m, eps=0.1, norm="linf", n_queries=60, seed=0),
    "square_l2": lambda m: SquareAttack(m, eps=1.0, norm="l2", n_queries=60, seed=0),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_craft_the_same_examples_through_either_path(attack):
    loop, vec = _pair(_members("cnn", 3))
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(32, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    a = ATTACKS[attack](loop)(x, y)
    b = ATTACKS[attack](vec)(x, y)
    assert float((a - b).abs().max()) <= 1e-6, f"{attack}: max |diff| {float((a - b).abs().max()):.2e}"


# ------------------------------------------------------------ precision --

def _data(n=96, c=1, hw=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, hw, hw, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return x, y


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_and_fp32_is_the_default(precision):
    x, y = _data()
    assert TrainSettings().precision == "fp32"
    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, [0.5], [0.25])
    settings = TrainSettings(lr=0.05, epochs=2, batch_size=32, precision=precision)
    weights, history = train_member(model, x, y, x[:32], y[:32], Plain(), settings, seed=0, progress=False)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h.train_loss)) for h in history)
    assert all(v.dtype == model.state_dict()[k].dtype for k, v in weights.items())  # weights stay fp32
    assert all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())


def test_fp16_resume_restores_the_grad_scaler():
    x, y = _data()
    settings = TrainSettings(lr=0.05, epochs=4, batch_size=32, precision="fp16")

    def trainer():
        torch.manual_seed(0)
        return MemberTrainer(build_model("cnn", 1, 10, [0.5], [0.25]), x, y, x[:32], y[:32], Plain(), settings, seed=3)

    whole = trainer()
    whole.run(4, progress=False)
    first = trainer()
    first.run(2, progress=False)
    state = first.state_dict()
    assert "scaler" in state
    second = trainer()
    second.load_state_dict(state)
    assert second.scaler.get_scale() == first.scaler.get_scale()
    second.run(2, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(whole.best_weights().values(), second.best_weights().values()))


def test_the_curvature_finite_difference_runs_in_fp32_under_autocast():
    """Under bf16 autocast the regulariser's passes run in fp32: its penalty equals the fp32 one."""
    from fedrobust.training import autocast

    x, y = _data(32)
    torch.manual_seed(0)
    model = build_model("cnn", 1, 10, [0.5], [0.25]).train()
    strategy = build_strategy(OmegaConf.create({"name": "curvature", "alpha": 1.0}))
    plain = strategy.loss(model, x, y)
    with autocast(torch.device("cpu"), "bf16"):
        reduced = strategy.loss(model, x, y)
    assert reduced.terms["curvature"] == pytest.approx(plain.terms["curvature"], rel=1e-6)
    with autocast(torch.device("cpu"), "bf16"):
        ce = Plain().loss(model, x, y)
    assert ce.logits.dtype == torch.bfloat16  # the plain passes do run in reduced precision


def test_epoch_augmentation_is_drawn_once_and_reproducible():
    from fedrobust.augment import crop_flip, draw_crop_flip, random_crop_flip

    x = torch.rand(10, 3, 6, 6)
    dy, dx, flip = draw_crop_flip(10, 2, torch.Generator().manual_seed(4))
    assert dy.min() >= 0 and dy.max() <= 4 and flip.dtype == torch.bool
    whole = crop_flip(x, dy, dx, flip, 2)
    halves = torch.cat([crop_flip(x[:5], dy[:5], dx[:5], flip[:5], 2), crop_flip(x[5:], dy[5:], dx[5:], flip[5:], 2)])
    assert torch.equal(whole, halves)  # applying per batch equals applying to the epoch at once
    assert torch.equal(random_crop_flip(x, 2, torch.Generator().manual_seed(4)), whole)


# ---------------------------------------------------------- checkpoints --

def test_a_checkpoint_saved_on_a_gpu_loads_on_cpu(tmp_path, monkeypatch):
    """Write a member checkpoint whose storages say ``cuda:0`` (as one saved on a GPU does), then load it here."""
    from fedrobust.runs.members import load_member

    member = _members("cnn", 1)[0]
    path = tmp_path / "member_0.pt"
    real_tag = torch.serialization.location_tag
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    torch.save(member.state_dict(), path)
    monkeypatch.setattr(torch.serialization, "location_tag", real_tag)
    if not torch.cuda.is_available():  # the file really names a GPU: a plain load fails here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    loaded = load_member(path, build_model("cnn", 1, 10, [0.4], [0.3]))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), member.state_dict().values()))
    assert next(loaded.parameters()).device.type == "cpu"


# ------------------------------------------------------------------ CUDA --

@cuda
@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_cuda_vectorised_ensemble_equals_the_cpu_loop(name):
    members = _members(name, 3)
    c, h, w = SHAPES.get(name, (3, 32, 32))
    x = torch.rand(16, c, h, w)
    with torch.no_grad():
        ref = LogitAverageEnsemble(members, vectorise=False)(x)
        ens = LogitAverageEnsemble(members).to("cuda")  # auto
        assert ens.vectorised
        got = ens(x.cuda()).cpu()
    assert torch.allclose(ref, got, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_with_every_precision(precision):
    x, y = _data(256, 3, 32)
    torch.manual_seed(0)
    model = build_model("resnet8", 3, 10, [0.5] * 3, [0.25] * 3)
    settings = TrainSettings(lr=0.05, epochs=2, batch_size=64, precision=precision, augment=True)
    weights, history = train_member(model, x, y, x[:64], y[:64], Plain(), settings, seed=0, device="cuda",
                                    progress=False)
    assert len(history) == 2 and all(v.device.type == "cpu" for v in weights.values())
    assert all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point())


@cuda
def test_cuda_checkpoint_loads_on_cpu_and_a_cpu_one_on_cuda(tmp_path):
    from fedrobust.runs.members import load_member

    member = _members("cnn", 1)[0]
    torch.save({k: v.cuda() for k, v in member.state_dict().items()}, tmp_path / "gpu.pt")
    loaded = load_member(tmp_path / "gpu.pt", build_model("cnn", 1, 10, [0.4], [0.3]))
    assert next(loaded.parameters()).device.type == "cpu"
    torch.save(member.state_dict(), tmp_path / "cpu.pt")
    on_gpu = load_member(tmp_path / "cpu.pt", build_model("cnn", 1, 10, [0.4], [0.3])).to("cuda")
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(on_gpu(x.cuda()).cpu(), member(x), atol=1e-5)
