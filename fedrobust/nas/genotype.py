"""Genotypes: the discrete cells a search derives, as plain data and as JSON.

A genotype names, for each of a cell's intermediate nodes, two (operation,
input) pairs: inputs 0 and 1 are the two previous cells' outputs, input
``k >= 2`` is the cell's own node ``k - 2``; the cell's output concatenates
all its intermediate nodes (DARTS). It also carries the size of the network
to build from it (``layers`` cells, ``channels`` in the first), so that a
file is a complete model: ``model=searched:PATH/genotype.json``.

:func:`discretise` is DARTS' rule: for each node, keep the two incoming
edges whose strongest non-zero operation has the largest softmax weight,
and on each the operation with that weight. :func:`load_genotype` reads a
file that may have come from anywhere: it is size-capped and checked field
by field, and every fault is a one-line :class:`GenotypeError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import one_line
from .ops import PRIMITIVES

__all__ = ["FORMAT", "Gene", "Genotype", "GenotypeError", "discretise", "genotype_from_dict", "load_genotype", "parse_genotype"]

FORMAT = "fedrobust-genotype/1"
MAX_FILE_BYTES = 64 * 1024
MAX_STEPS, MAX_LAYERS, MAX_CHANNELS, MAX_STEM = 8, 64, 512, 8
# Fewer than 4 channels: PyTorch 2.13's CPU backward passes of these supernets abort the process with heap
# corruption ("corrupted double-linked list") at 1 thread, measured with 2 and 3 channels; the culprit
# kernel was not isolated, so such widths are refused rather than allowed to crash.
MIN_CHANNELS = 4
_KEYS = {"format", "normal", "reduce", "layers", "channels", "stem_multiplier", "stem_stride", "search"}


class GenotypeError(ValueError):
    """A genotype that cannot be built. The message is one line."""


Gene = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Genotype:
    normal: Gene  # 2 (operation, input) pairs per intermediate node
    reduce: Gene
    layers: int = 5
    channels: int = 8
    stem_multiplier: int = 3
    stem_stride: int = 1  # 2 halves 28x28 inputs in the stem: a quarter of the cells' cost

    @property
    def steps(self) -> int:
        return len(self.normal) // 2

    def to_dict(self, search: dict[str, Any] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "normal": [list(g) for g in self.normal],
                               "reduce": [list(g) for g in self.reduce], "layers": self.layers,
                               "channels": self.channels, "stem_multiplier": self.stem_multiplier,
                               "stem_stride": self.stem_stride}
        if search is not None:
            out["search"] = search
        return out

    def to_json(self) -> str:
        """Canonical compact JSON of the architecture alone (no search notes): equal genotypes, equal text."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)


def discretise(alpha_normal: torch.Tensor, alpha_reduce: torch.Tensor, steps: int, *, layers: int,
               channels: int, stem_multiplier: int = 3, stem_stride: int = 1) -> Genotype:
    """DARTS' rule on the (edges, operations) architecture parameters of the normal and reduction cells."""

    def cell(alpha: torch.Tensor) -> Gene:
        w = torch.softmax(alpha.detach().double(), dim=-1).cpu()
        none = PRIMITIVES.index("none")
        genes: list[tuple[str, int]] = []
        start = 0
        for node in range(steps):
            n_in = node + 2
            rows = w[start:start + n_in].clone()
            rows[:, none] = -1.0
            strength = rows.max(dim=1).values
            # ties: the lower input first (stable sort), so the result never depends on float noise in the order
            order = sorted(range(n_in), key=lambda j: (-float(strength[j]), j))[:2]
            for j in sorted(order):
                genes.append((PRIMITIVES[int(rows[j].argmax())], j))
            start += n_in
        return tuple(genes)

    expected = steps * (steps + 3) // 2
    for name, a in (("normal", alpha_normal), ("reduce", alpha_reduce)):
        if tuple(a.shape) != (expected, len(PRIMITIVES)):
            raise ValueError(f"alpha_{name} has shape {tuple(a.shape)}, expected ({expected}, {len(PRIMITIVES)})")
    return Genotype(cell(alpha_normal), cell(alpha_reduce), layers, channels, stem_multiplier, stem_stride)


def _int(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise GenotypeError(f"'{key}' must be an integer in [{low}, {high}], got {value!r:.40}")
    return value


def _cell(value: Any, key: str) -> Gene:
    if not isinstance(value, list) or not value or len(value) % 2 or len(value) > 2 * MAX_STEPS:
        raise GenotypeError(f"'{key}' must be a list of 2 [operation, input] pairs per node "
                            f"(2 to {2 * MAX_STEPS} pairs)")
    genes = []
    for i, gene in enumerate(value):
        node = i // 2
        if not (isinstance(gene, list) and len(gene) == 2 and isinstance(gene[0], str)):
            raise GenotypeError(f"'{key}'[{i}] must be [operation, input], got {gene!r:.60}")
        op, j = gene
        if op not in PRIMITIVES or op == "none":
            raise GenotypeError(f"'{key}'[{i}]: unknown operation {op!r:.40} (choose from {', '.join(PRIMITIVES[1:])})")
        genes.append((op, _int(j, f"{key}[{i}] input", 0, node + 1)))
    return tuple(genes)


def genotype_from_dict(raw: Any) -> Genotype:
    """A checked :class:`Genotype` from decoded JSON; :class:`GenotypeError` names the first fault."""
    if not isinstance(raw, dict):
        raise GenotypeError(f"expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") != FORMAT:
        raise GenotypeError(f"'format' must be '{FORMAT}', got {raw.get('format')!r:.40}")
    unknown = sorted(str(k) for k in raw if k not in _KEYS)
    if unknown:
        raise GenotypeError(f"unknown key(s) {', '.join(u[:40] for u in unknown[:5])}")
    for key in ("normal", "reduce", "layers", "channels"):
        if key not in raw:
            raise GenotypeError(f"missing '{key}'")
    normal, reduce = _cell(raw["normal"], "normal"), _cell(raw["reduce"], "reduce")
    if len(normal) != len(reduce):
        raise GenotypeError(f"'normal' and 'reduce' must have as many nodes, got {len(normal) // 2} and {len(reduce) // 2}")
    return Genotype(normal, reduce, _int(raw["layers"], "layers", 1, MAX_LAYERS),
                    _int(raw["channels"], "channels", MIN_CHANNELS, MAX_CHANNELS),
                    _int(raw.get("stem_multiplier", 3), "stem_multiplier", 1, MAX_STEM),
                    _int(raw.get("stem_stride", 1), "stem_stride", 1, 2))


def parse_genotype(text: str | bytes) -> Genotype:
    if len(text) > MAX_FILE_BYTES:
        raise GenotypeError(f"{len(text)} bytes, more than a genotype's {MAX_FILE_BYTES}")
    try:
        raw = json.loads(text)
    except RecursionError:
        raise GenotypeError("JSON nested too deeply") from None
    except ValueError as exc:
        raise GenotypeError(f"not JSON ({one_line(exc)})") from None
    return genotype_from_dict(raw)


def load_genotype(path: str | Path) -> Genotype:
    """The genotype in ``path``; :class:`GenotypeError` (one line, naming the file) for anything else."""
    path = Path(path)
    try:
        if not path.is_file():
            raise GenotypeError("no such file")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise GenotypeError(f"{path.stat().st_size} bytes, more than a genotype's {MAX_FILE_BYTES}")
        return parse_genotype(path.read_bytes())
    except GenotypeError as exc:
        raise GenotypeError(f"{path}: {exc}") from None
    except OSError as exc:
        raise GenotypeError(f"{path}: cannot read ({exc.strerror or exc})") from None
