"""Curvature and EDLCM train ResNet-18 at the defaults and lr 0.4 with every loss finite.

Without the bound on the penalty's weight gradient (``clip_grad_norm``) the
first steps at this learning rate blow the weights up and the loss reaches
NaN within a few steps (see strategies/regulariser.py, "Stability", and
benchmarks/resnet18_stability.py for the 10-epoch measurement).
"""

import math

import pytest
import torch

from fedrobust.models import build_model
from fedrobust.training import MemberTrainer, TrainSettings
from strategies import EDLCM, Curvature


def _resnet18(seed):
    torch.manual_seed(seed)
    return build_model("resnet18", 3, 10, (0.5,) * 3, (0.25,) * 3)


def _cifar_shaped(n, seed=0):
    """3x32x32 images of 10 classes: half a class prototype, half uniform noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(10, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return 0.5 * prototypes[y] + 0.5 * torch.rand(n, 3, 32, 32, generator=g), y


@pytest.mark.slow
@pytest.mark.parametrize("name", ["curvature", "edlcm"])
def test_resnet18_trains_with_finite_losses_at_lr_0_4(name):
    x, y = _cifar_shaped(24)
    strategy, peers = (Curvature(), []) if name == "curvature" else (EDLCM(), [_resnet18(1).eval()])
    settings = TrainSettings(lr=0.4, epochs=3, batch_size=8)  # two steps per epoch
    trainer = MemberTrainer(_resnet18(0), x[:16], y[:16], x[16:], y[16:], strategy, settings, seed=0)
    records = trainer.run(3, peers=peers, progress=False)
    assert len(records) == 3
    for r in records:
        values = [r.train_loss, r.val_loss, *r.terms.values()]
        assert all(math.isfinite(v) for v in values), f"{name} epoch {r.epoch}: {r}"
