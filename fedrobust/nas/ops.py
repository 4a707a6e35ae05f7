"""The candidate operations of the DARTS search space (AdvRush, appendix A1).

Eight operations per edge: ``none`` (zero), ``skip_connect``, 3x3 average
and max pooling, 3x3 and 5x5 separable convolutions (two stacked
ReLU-depthwise-pointwise-BN blocks, as DARTS has them) and 3x3 and 5x5
dilated convolutions (dilation 2). An operation on an edge out of a
reduction cell's input node has stride 2; every operation then maps
``H`` to ``ceil(H / 2)``, odd sizes included (7 -> 4), so one space serves
8x8, 28x28 and 32x32 inputs.

``affine=False`` builds the supernet's batch norms without learned scale
and shift (DARTS: the architecture weights would otherwise be rescaled by
them); the discrete networks use ``affine=True``.

Written here: torchvision has no DARTS operations and the reference code
is a research script, not a library.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OPS", "PRIMITIVES", "FactorizedReduce", "ReLUConvBN", "Zero", "make_op"]

PRIMITIVES = ("none", "skip_connect", "avg_pool_3x3", "max_pool_3x3",
              "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")


class Zero(nn.Module):
    """The ``none`` operation: zeros with the strided output's shape."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class ReLUConvBN(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool) -> None:
        super().__init__(nn.ReLU(inplace=False), nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False),
                         nn.BatchNorm2d(c_out, affine=affine))


class FactorizedReduce(nn.Module):
    """Halve the resolution with two 1x1 convolutions of stride 2, one shifted by a pixel (skip with stride 2).

    The shifted branch pads one row and column first, so both branches give ``ceil(H / 2)`` for odd ``H`` too.
    """

    def __init__(self, c_in: int, c_out: int, affine: bool) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        self.conv_a = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_b = nn.Conv2d(c_in, c_out - c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
        return self.bn(torch.cat([self.conv_a(x), self.conv_b(shifted)], dim=1))


def _sep_conv(c: int, kernel: int, stride: int, affine: bool) -> nn.Sequential:
    pad = kernel // 2
    return nn.Sequential(
        nn.ReLU(inplace=False), nn.Conv2d(c, c, kernel, stride, pad, groups=c, bias=False),
        nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c, affine=affine),
        nn.ReLU(inplace=False), nn.Conv2d(c, c, kernel, 1, pad, groups=c, bias=False),
        nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c, affine=affine),
    )


def _dil_conv(c: int, kernel: int, stride: int, affine: bool) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(inplace=False), nn.Conv2d(c, c, kernel, stride, 2 * (kernel // 2), dilation=2, groups=c, bias=False),
        nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c, affine=affine),
    )


OPS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "none": lambda c, stride, affine: Zero(stride),
    "skip_connect": lambda c, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine),
    "avg_pool_3x3": lambda c, stride, affine: nn.AvgPool2d(3, stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda c, stride, affine: nn.MaxPool2d(3, stride, padding=1),
    "sep_conv_3x3": lambda c, stride, affine: _sep_conv(c, 3, stride, affine),
    "sep_conv_5x5": lambda c, stride, affine: _sep_conv(c, 5, stride, affine),
    "dil_conv_3x3": lambda c, stride, affine: _dil_conv(c, 3, stride, affine),
    "dil_conv_5x5": lambda c, stride, affine: _dil_conv(c, 5, stride, affine),
}


def make_op(name: str, channels: int, stride: int, affine: bool) -> nn.Module:
    return OPS[name](channels, stride, affine)
