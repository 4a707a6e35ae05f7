"""The weight-sharing supernet of the search (DARTS; AdvRush eq. 6-7).

Every edge ``(i, j)`` of a cell is a :class:`MixedEdge`: the softmax of its
architecture parameters ``alpha`` weighs the eight candidate operations
(eq. 7), and each node sums its incoming edges (eq. 6). All normal cells
share one ``alpha`` of shape ``(edges, 8)`` and all reduction cells
another, with ``edges = steps * (steps + 3) / 2`` (14 for DARTS' 4 nodes).
The ``none`` operation contributes zeros, so it is not computed; its
weight still takes its share of the softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .genotype import Genotype, discretise
from .network import CellBase, CellStack
from .ops import PRIMITIVES, make_op

__all__ = ["MixedEdge", "Supernet", "edge_count"]


def edge_count(steps: int) -> int:
    return steps * (steps + 3) // 2


class MixedEdge(nn.Module):
    """``sum_o w_o * o(x)`` over the candidate operations (``w``: one softmax row)."""

    def __init__(self, channels: int, stride: int, primitives: Sequence[str] = PRIMITIVES) -> None:
        super().__init__()
        self.names = tuple(primitives)
        self.ops = nn.ModuleList(
            # DARTS: a pooling's output gets a parameter-free batch norm, like the convolutions' outputs
            nn.Sequential(make_op(p, channels, stride, affine=False), nn.BatchNorm2d(channels, affine=False))
            if "pool" in p else make_op(p, channels, stride, affine=False)
            for p in self.names
        )

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = None
        for name, op, w in zip(self.names, self.ops, weights):
            if name == "none":
                continue
            term = w * op(x)
            out = term if out is None else out + term
        return out


class SearchCell(CellBase):
    def __init__(self, steps: int, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool) -> None:
        super().__init__(c_pp, c_p, c, reduction_prev, affine=False)
        self.steps, self.reduction = steps, reduction
        self.edges = nn.ModuleList(
            MixedEdge(c, 2 if reduction and j < 2 else 1) for node in range(steps) for j in range(node + 2)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        offset = 0
        for _ in range(self.steps):
            states.append(sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states)))
            offset += len(states) - 1
        return torch.cat(states[2:], dim=1)


class Supernet(CellStack):
    """The continuous relaxation: weights ``w`` (every module parameter) and ``alpha_normal``, ``alpha_reduce``.

    ``alpha`` starts at ``1e-3 * N(0, 1)`` (DARTS), drawn from ``generator`` when given.
    """

    def __init__(self, in_channels: int, num_classes: int, layers: int = 3, channels: int = 8, steps: int = 4,
                 stem_multiplier: int = 3, generator: torch.Generator | None = None, stem_stride: int = 1) -> None:
        super().__init__(in_channels, num_classes, layers, channels, steps, stem_multiplier,
                         lambda c_pp, c_p, c, red, red_prev: SearchCell(steps, c_pp, c_p, c, red, red_prev), stem_stride)
        self.steps, self.layers, self.channels, self.stem_multiplier = steps, layers, channels, stem_multiplier
        self.stem_stride = stem_stride
        shape = (edge_count(steps), len(PRIMITIVES))
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(shape, generator=generator))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(shape, generator=generator))

    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alpha_normal, self.alpha_reduce]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_normal = torch.softmax(self.alpha_normal, dim=-1)
        w_reduce = torch.softmax(self.alpha_reduce, dim=-1)
        return self.run_cells(x, lambda cell, s0, s1: cell(s0, s1, w_reduce if cell.reduction else w_normal))

    def genotype(self, layers: int | None = None, channels: int | None = None) -> Genotype:
        """The discrete architecture (DARTS' rule), for a network of ``layers`` cells and ``channels`` channels."""
        return discretise(self.alpha_normal, self.alpha_reduce, self.steps, layers=layers or self.layers,
                          channels=channels or self.channels, stem_multiplier=self.stem_multiplier,
                          stem_stride=self.stem_stride)

    def alpha_entropy(self) -> dict[str, torch.Tensor]:
        """Each edge's softmax entropy (nats; ln 8 = 2.08 is uniform), per cell type."""
        out = {}
        for name, a in (("normal", self.alpha_normal), ("reduce", self.alpha_reduce)):
            p = torch.softmax(a.detach(), dim=-1)
            out[name] = -(p * p.clamp_min(1e-30).log()).sum(-1)
        return out
