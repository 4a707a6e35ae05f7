"""The DARTS macro-architecture, and the discrete network a genotype builds.

``stem (3x3 conv of stride 1, or 2 for large inputs; BN) -> layers cells -> global average pool -> linear``.
Cells at ``layers // 3`` and ``2 * layers // 3`` are reduction cells: they
halve the resolution and double the channels. Each cell reads the two
previous cells' outputs (a 1x1 ReLU-conv-BN brings them to the cell's
width; after a reduction, the older one is halved by :class:`FactorizedReduce`).
The supernet (:mod:`.supernet`) and :class:`SearchedNetwork` share this
frame and differ only in their cells. DARTS' evaluation network also has an
auxiliary head and drop-path; neither is used here (members train for tens
of epochs, not 600).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .genotype import Gene, Genotype
from .ops import FactorizedReduce, ReLUConvBN, make_op

__all__ = ["CellStack", "SearchedCell", "SearchedNetwork", "reduction_layers"]


def reduction_layers(layers: int) -> set[int]:
    return {layers // 3, 2 * layers // 3}


class CellBase(nn.Module):
    def __init__(self, c_pp: int, c_p: int, c: int, reduction_prev: bool, affine: bool) -> None:
        super().__init__()
        self.pre0 = FactorizedReduce(c_pp, c, affine) if reduction_prev else ReLUConvBN(c_pp, c, 1, 1, 0, affine)
        self.pre1 = ReLUConvBN(c_p, c, 1, 1, 0, affine)


class CellStack(nn.Module):
    """Stem, cells built by ``make_cell(c_pp, c_p, c, reduction, reduction_prev)``, pooled linear head."""

    def __init__(self, in_channels: int, num_classes: int, layers: int, channels: int, steps: int,
                 stem_multiplier: int, make_cell: Callable[[int, int, int, bool, bool], nn.Module],
                 stem_stride: int = 1) -> None:
        super().__init__()
        c_stem = stem_multiplier * channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c_stem, 3, stem_stride, padding=1, bias=False), nn.BatchNorm2d(c_stem))
        c_pp, c_p, c = c_stem, c_stem, channels
        cells, reduction_prev = [], False
        for i in range(layers):
            reduction = i in reduction_layers(layers)
            c = 2 * c if reduction else c
            cells.append(make_cell(c_pp, c_p, c, reduction, reduction_prev))
            reduction_prev = reduction
            c_pp, c_p = c_p, steps * c
        self.cells = nn.ModuleList(cells)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_p, num_classes)

    def run_cells(self, x: torch.Tensor, cell_call: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]):
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell_call(cell, s0, s1)
        return self.classifier(self.pool(s1).flatten(1))


class SearchedCell(CellBase):
    """A discrete cell: each node sums its two genes' operations on their inputs."""

    def __init__(self, genes: Gene, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool) -> None:
        super().__init__(c_pp, c_p, c, reduction_prev, affine=True)
        self.inputs = [j for _, j in genes]
        self.ops = nn.ModuleList(make_op(op, c, 2 if reduction and j < 2 else 1, affine=True) for op, j in genes)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for node in range(len(self.ops) // 2):
            a, b = 2 * node, 2 * node + 1
            states.append(self.ops[a](states[self.inputs[a]]) + self.ops[b](states[self.inputs[b]]))
        return torch.cat(states[2:], dim=1)


class SearchedNetwork(CellStack):
    """The network a genotype describes (its ``layers`` and ``channels``)."""

    def __init__(self, genotype: Genotype, in_channels: int, num_classes: int) -> None:
        g = genotype
        super().__init__(in_channels, num_classes, g.layers, g.channels, g.steps, g.stem_multiplier,
                         lambda c_pp, c_p, c, red, red_prev: SearchedCell(g.reduce if red else g.normal,
                                                                          c_pp, c_p, c, red, red_prev),
                         g.stem_stride)
        self.genotype = genotype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_cells(x, lambda cell, s0, s1: cell(s0, s1))
