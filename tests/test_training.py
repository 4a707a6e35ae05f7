import math
import subprocess
import sys

import pytest
import torch

from fedrobust.augment import random_crop_flip
from fedrobust.config import load_config
from fedrobust.node import epochs_per_round, train_node_round
from fedrobust.training import MemberTrainer, MomentumSGD, TrainSettings, cosine_lr, evaluate_model, member_seed
from strategies import LossTerms, Plain, TrainingStrategy


def _cfg(*extra):
    return load_config(["train.progress=false", "train.epochs=4", *extra])


def test_cosine_schedule_matches_torch():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)
    for e in range(7):
        assert math.isclose(cosine_lr(0.1, e, 7), opt.param_groups[0]["lr"], rel_tol=1e-9)
        opt.step()
        sched.step()


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 5e-4), (0.0, 1e-2), (0.5, 0.0)])
def test_momentum_sgd_steps_as_torch_optim_sgd_bit_for_bit(momentum, weight_decay):
    def model():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                                       torch.nn.Linear(12, 2))

    ours, ref = model(), model()
    opt = MomentumSGD(ours.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        x, y = torch.randn(5, 1, 4, 4, generator=g), torch.randint(0, 2, (5,), generator=g)
        for m, o in ((ours, opt), (ref, ref_opt)):
            for group in o.param_groups:
                group["lr"] = cosine_lr(0.1, step, 6)  # as MemberTrainer sets it, once per epoch
            o.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            if step == 2:
                m[3].bias.grad = None  # a parameter without a gradient this step is left alone by both
            o.step()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
        if momentum:
            assert torch.equal(opt.state[a]["momentum_buffer"], ref_opt.state[b]["momentum_buffer"]), name
    assert bool(opt.state) == bool(momentum)


def test_training_does_not_import_torch_dynamo():
    """A process that trains never builds a torch.optim optimiser, whose construction imports torch._dynamo
    (1.5-2 s of CPU in every Flower actor, ClientApp process and Ray trial worker)."""
    code = ("import sys, torch\n"
            "from fedrobust.training import MemberTrainer, TrainSettings\n"
            "from strategies import Plain\n"
            "x, y = torch.rand(16, 1, 4, 4), torch.randint(0, 2, (16,))\n"
            "m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))\n"
            "MemberTrainer(m, x, y, x, y, Plain(), TrainSettings(epochs=2, batch_size=8), seed=0).run(2, progress=False)\n"
            "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False"]


def test_augmentation_crops_and_flips_within_the_image():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=g)
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    assert not torch.equal(out, x)
    # every output pixel is either padding (0) or one of the image's pixels
    for i in range(4):
        vals = set(x[i].flatten().tolist()) | {0.0}
        assert set(out[i].flatten().tolist()) <= vals
    again = random_crop_flip(x, 2, torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    flipped_only = random_crop_flip(x, 0, torch.Generator().manual_seed(1))
    same = [(torch.equal(flipped_only[i], x[i]) or torch.equal(flipped_only[i], x[i].flip(2))) for i in range(64)]
    assert all(same)


def test_member_seeds_differ_and_are_stable():
    assert member_seed(0, 0) == member_seed(0, 0)
    assert len({member_seed(s, m) for s in range(3) for m in range(5)}) == 15


class _Counting(TrainingStrategy):
    """Plain CE that also records the batches it saw."""

    name = "counting"

    def __init__(self):
        self.batches = []

    def loss(self, model, x, y, *, peers=()):
        self.batches.append(y.clone())
        return Plain().loss(model, x, y)


def _tiny(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(60, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0.5).long()
    return x[:40], y[:40], x[40:], y[40:]


def test_best_validation_checkpoint_is_kept_and_early_stopping_fires():
    xt, yt, xv, yv = _tiny()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    # a huge lr makes validation loss blow up after the first epochs
    settings = TrainSettings(lr=50.0, momentum=0.9, weight_decay=0.0, epochs=30, batch_size=8, patience=3)
    trainer = MemberTrainer(model, xt, yt, xv, yv, Plain(), settings, seed=0)
    history = trainer.run(30, progress=False)
    assert trainer.stopped and len(history) < 30
    best = min(history, key=lambda r: r.val_loss)
    assert trainer.best_epoch == best.epoch
    assert len(history) == trainer.best_epoch + 1 + settings.patience
    model.load_state_dict(trainer.best_weights())
    loss, _ = evaluate_model(model, xv, yv)
    assert math.isclose(loss, best.val_loss, rel_tol=1e-5)


def test_resuming_from_state_dict_continues_bit_for_bit():
    xt, yt, xv, yv = _tiny()
    settings = TrainSettings(lr=0.05, epochs=6, batch_size=8, augment=True, crop_padding=1)

    def fresh():
        with torch.random.fork_rng():
            torch.manual_seed(3)
            return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(144, 2))

    a = MemberTrainer(fresh(), xt, yt, xv, yv, Plain(), settings, seed=5)
    a.run(6, progress=False)
    b = MemberTrainer(fresh(), xt, yt, xv, yv, Plain(), settings, seed=5)
    b.run(2, progress=False)
    c = MemberTrainer(fresh(), xt, yt, xv, yv, Plain(), settings, seed=5)
    c.load_state_dict(b.state_dict())
    c.run(4, progress=False)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, c.model.state_dict()[k]), k
    assert a.best_epoch == c.best_epoch


def test_epochs_split_over_rounds():
    assert epochs_per_round(_cfg("train.epochs=10", "train.rounds=3")) == [4, 3, 3]
    assert sum(epochs_per_round(_cfg("train.epochs=40", "train.rounds=4"))) == 40


def test_node_round_respects_shards_and_reports_class_counts():
    cfg = _cfg("train.epochs=1")
    (u,) = train_node_round(cfg, 1, 0, {})
    assert u.node == 1 and u.member == 1
    assert sum(u.class_counts) == u.num_train_samples
    assert u.epochs_trained == 1 and len(u.history) == 1


def test_strategy_sees_batches_from_the_seeded_generator():
    xt, yt, xv, yv = _tiny()
    runs = []
    for _ in range(2):
        s = _Counting()
        MemberTrainer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)), xt, yt, xv, yv, s,
                      TrainSettings(epochs=2, batch_size=8), seed=11).run(2, progress=False)
        runs.append(torch.cat(s.batches))
    assert torch.equal(runs[0], runs[1])


def test_loss_terms_reach_the_history():
    class TwoTerms(TrainingStrategy):
        name = "two"

        def loss(self, model, x, y, *, peers=()):
            out = Plain().loss(model, x, y)
            reg = sum(p.pow(2).sum() for p in model.parameters()) * 1e-3
            return LossTerms(out.total + reg, {"ce": out.terms["ce"], "reg": float(reg)}, out.logits)

    xt, yt, xv, yv = _tiny()
    t = MemberTrainer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2)), xt, yt, xv, yv, TwoTerms(),
                      TrainSettings(epochs=1, batch_size=8), seed=0)
    (rec,) = t.run(1, progress=False)
    assert set(rec.terms) == {"ce", "reg"} and rec.terms["reg"] > 0
    assert rec.train_loss == pytest.approx(rec.terms["ce"] + rec.terms["reg"], rel=1e-5)
