import pytest
import torch

from fedrobust.models import MODEL_BUILDERS, Normalize, build_model
from fedrobust.training import TrainSettings, train_member
from strategies import Plain


@pytest.mark.parametrize("name", sorted(MODEL_BUILDERS))
@pytest.mark.parametrize("shape,classes", [((1, 8, 8), 10), ((3, 32, 32), 100)])
def test_each_model_builds_and_trains_one_epoch(name, shape, classes):
    g = torch.Generator().manual_seed(0)
    c = shape[0]
    x = torch.rand(24, *shape, generator=g)
    y = torch.randint(0, classes, (24,), generator=g)
    model = build_model(name, c, classes, [0.5] * c, [0.25] * c)
    assert isinstance(model[0], Normalize)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(epochs=1, batch_size=8, lr=0.01, augment=(c == 3), crop_padding=4)
    weights, history = train_member(model, x[:16], y[:16], x[16:], y[16:], Plain(), settings, seed=0, progress=False)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0].train_loss))
    assert weights.keys() == before.keys()
    assert any(not torch.equal(weights[k], before[k]) for k in before if k.endswith("weight"))
    model.eval()
    assert model(x[:2]).shape == (2, classes)


def test_normalisation_is_the_first_layer_and_travels_with_the_weights():
    model = build_model("cnn", 3, 10, [0.1, 0.2, 0.3], [0.5, 0.5, 0.5])
    sd = model.state_dict()
    assert torch.allclose(sd["0.mean"].flatten(), torch.tensor([0.1, 0.2, 0.3]))
    x = torch.full((1, 3, 4, 4), 0.6)
    assert torch.allclose(model[0](x)[0, :, 0, 0], torch.tensor([1.0, 0.8, 0.6]))


def test_cifar_resnet_keeps_full_resolution_in_the_stem():
    model = build_model("resnet18", 3, 10, [0.5] * 3, [0.25] * 3)
    body = model[1]
    assert body.conv1.kernel_size == (3, 3) and body.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in body.modules())
    seen = {}
    body.layers[0].register_forward_hook(lambda m, i, o: seen.update(hw=o.shape[-1]))
    model(torch.rand(1, 3, 32, 32))
    assert seen["hw"] == 32
