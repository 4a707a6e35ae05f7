"""The model zoo. Every model starts with :class:`Normalize`, so it takes [0, 1] inputs.

``build_model(name, in_channels, num_classes, mean, std)`` returns a fresh
model; the input channels, class count and normalisation come from the data.
Models are built in the channels-last layout (see :func:`build_model`).
The CIFAR variants keep full resolution in the stem (3x3 conv, no max-pool)
and end in global average pooling, so they also run on small images.

Besides the hand-made models (:data:`MODEL_BUILDERS`), a name may be a
searched architecture (:mod:`fedrobust.nas`): ``searched:PATH`` of a genotype
file, or ``searched:{...}``, the genotype's JSON itself. :func:`resolve_model`
turns the first into the second, the form a node receives (it never reads a
file); a genotype that cannot be built is a one-line
:class:`~fedrobust.nas.GenotypeError`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..nas import SearchedNetwork
from .settings import SEARCHED_PREFIX, is_searched, read_genotype
from .cnn import SmallCNN
from .lenet import ConvNet, LeNet5
from .mlp import MLP
from .mobilenet import MobileNetV2
from .resnet import resnet8, resnet18, resnet34
from .vgg import vgg7_bn, vgg16_bn

__all__ = ["DATA_SHAPES", "MODEL_BUILDERS", "Normalize", "build_model", "count_parameters", "resolve_model"]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean and std are buffers, so they travel with the weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


MODEL_BUILDERS: dict[str, Callable[[int, int], nn.Module]] = {
    "cnn": SmallCNN,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "mobilenetv2": MobileNetV2,
    "vgg16": vgg16_bn,
    # small models for 8x8 inputs: the digits surrogate zoo
    "resnet8": resnet8,
    "vgg7": vgg7_bn,
    "mlp": MLP,
    # 28x28 grey images (MNIST, Fashion-MNIST): the default member and a second convolutional family for the zoo
    "lenet": LeNet5,
    "convnet": ConvNet,
}


# (channels, height, width, classes) of each data set's images: a model's size depends on channels and classes
DATA_SHAPES = {"digits": (1, 8, 8, 10), "mnist": (1, 28, 28, 10), "fashion_mnist": (1, 28, 28, 10),
               "cifar10": (3, 32, 32, 10), "cifar100": (3, 32, 32, 100)}


def resolve_model(name: str) -> str:
    """The model as a node receives it: a hand-made model's name as it is; a searched one as ``searched:``
    and its genotype's canonical JSON (:meth:`~fedrobust.nas.Genotype.to_json`), whatever file it was in."""
    return SEARCHED_PREFIX + read_genotype(name).to_json() if is_searched(name) else name


def build_model(
    name: str, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]
) -> nn.Sequential:
    """A model named ``name`` whose first layer normalises its [0, 1] input."""
    if is_searched(name):
        body: nn.Module = SearchedNetwork(read_genotype(name), in_channels, num_classes)
    else:
        try:
            body = MODEL_BUILDERS[name](in_channels, num_classes)
        except KeyError:
            raise ValueError(f"unknown model '{name}' (choose from {', '.join(MODEL_BUILDERS)}, "
                             "or searched:PATH)") from None
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"normalisation has {len(mean)} channels, data has {in_channels}")
    # channels-last: the layout the convolution kernels prefer on CPU (oneDNN) and CUDA (cuDNN, tensor cores); an
    # NCHW input is converted by the first convolution. On 2 CPU cores a training step took 0.59x the time (convnet),
    # 0.73x (resnet8), 0.77x (CIFAR resnet18), 1.02x (lenet), an input gradient 0.59-0.92x; an MLP is unchanged
    return nn.Sequential(Normalize(mean, std), body).to(memory_format=torch.channels_last)


def count_parameters(name: str, data: str) -> int:
    """Parameters of model ``name`` built for data set ``data``'s images (built on the CPU, never run)."""
    channels, _, _, classes = DATA_SHAPES[data]
    model = build_model(name, channels, classes, [0.0] * channels, [1.0] * channels)
    return sum(p.numel() for p in model.parameters())
