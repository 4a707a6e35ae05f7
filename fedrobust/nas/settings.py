"""``arch_search.*``: the settings of ``fedrobust search-arch`` and their checks.

The defaults are the paper's (AdvRush section 5.1, DARTS' supernet of 8
cells of 16 channels): 60 epochs of which 50 warm up without the penalty,
h = 1.5, gamma = 0.01 (appendix A3), batch 32; w by momentum SGD (lr 0.025,
cosine-annealed to 0.001, momentum 0.9, weight decay 3e-4, gradient norm
clipped at 5 as DARTS does), alpha by Adam (lr 3e-4, betas (0.5, 0.999),
weight decay 1e-3). ``arch_search=small`` (``conf/arch_search/small.yaml``)
is a search that fits a 2-core machine on 28x28 images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

from ..errors import check
from ..searchdir import load_group
from .genotype import MAX_CHANNELS, MAX_LAYERS, MAX_STEM, MAX_STEPS, MIN_CHANNELS

__all__ = ["PRESETS", "ArchSearchConfig", "load_settings", "validate_arch_search"]


@dataclass
class ArchSearchConfig:
    epochs: int = 60  # search epochs
    warmup: int = 50  # epochs without the penalty (Alg. 1); the penalty from epoch warmup + 1 on
    gamma: float = 0.01  # eq. 10's strength; 0: plain DARTS
    h: float = 1.5  # eq. 10's step along z*, in [0, 1]-pixel L2 units
    batch_size: int = 32  # images per step, on each half
    w_lr: float = 0.025  # the weights' SGD learning rate, cosine-annealed ...
    w_lr_min: float = 0.001  # ... down to this
    w_momentum: float = 0.9  # the weights' SGD momentum
    w_weight_decay: float = 3e-4  # the weights' weight decay
    grad_clip: float = 5.0  # bound on the L2 norm of the weights' gradient
    alpha_lr: float = 3e-4  # the architecture parameters' (alpha) Adam learning rate
    alpha_betas: list[float] = field(default_factory=lambda: [0.5, 0.999])  # alpha's Adam betas
    alpha_weight_decay: float = 1e-3  # alpha's weight decay
    layers: int = 8  # the supernet's cells
    channels: int = 16  # the supernet's first cells' width
    steps: int = 4  # intermediate nodes per cell
    stem_multiplier: int = 3  # the stem's width, in multiples of channels
    stem_stride: int = 1  # 2: the stem halves the images (28x28 -> 14x14), for the supernet and the genotype
    net_layers: int | None = None  # the genotype's network; null: as the supernet
    net_channels: int | None = None  # the genotype's network's first cells' width; null: as the supernet
    images: int | None = None  # training images used (both halves together, stratified); null: all
    split_seed: int = 0  # which half updates w and which alpha
    seed: int = 0  # initialisation and batch order
    probe_images: int = 32  # fixed alpha-half images for lambda_max and the penalty's value per epoch
    power_iters: int = 10  # power iterations for lambda_max, the Hessian's largest eigenvalue
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True  # progress bars on a terminal


def _check(ok: bool, key: str, msg: str) -> None:
    check(ok, f"arch_search.{key}", msg)


def validate_arch_search(s: DictConfig) -> None:
    """One-line :class:`ConfigError` naming the first key at fault."""
    for key in ("epochs", "batch_size", "probe_images", "power_iters"):
        _check(s[key] >= 1, key, f"must be >= 1, got {s[key]}")
    _check(0 <= s.warmup <= s.epochs, "warmup", f"must be in [0, epochs ({s.epochs})], got {s.warmup}")
    _check(s.gamma >= 0, "gamma", f"must be >= 0 (0: plain DARTS), got {s.gamma}")
    _check(s.h > 0, "h", f"must be > 0, got {s.h}")
    for key in ("w_lr", "alpha_lr"):
        _check(s[key] > 0, key, f"must be > 0, got {s[key]}")
    _check(0 <= s.w_lr_min <= s.w_lr, "w_lr_min", f"must be in [0, w_lr], got {s.w_lr_min}")
    _check(0 <= s.w_momentum < 1, "w_momentum", f"must be in [0, 1), got {s.w_momentum}")
    for key in ("w_weight_decay", "alpha_weight_decay"):
        _check(s[key] >= 0, key, f"must be >= 0, got {s[key]}")
    _check(s.grad_clip > 0, "grad_clip", f"must be > 0, got {s.grad_clip}")
    betas = list(s.alpha_betas)
    _check(len(betas) == 2 and all(0 <= b < 1 for b in betas), "alpha_betas", f"must be two numbers in [0, 1), got {betas}")
    for key, low, high in (("layers", 1, MAX_LAYERS), ("net_layers", 1, MAX_LAYERS), ("channels", MIN_CHANNELS, MAX_CHANNELS),
                           ("net_channels", MIN_CHANNELS, MAX_CHANNELS), ("steps", 1, MAX_STEPS),
                           ("stem_multiplier", 1, MAX_STEM)):
        if s[key] is not None:
            _check(low <= s[key] <= high, key, f"must be in [{low}, {high}], got {s[key]}")
    # cells at layers // 3 and 2 * layers // 3 reduce: with fewer than 3 every cell reduces, and the normal
    # cell's alpha would get no gradient, yet the genotype would report one read from its initialisation
    _check(s.layers >= 3, "layers", f"must be >= 3 (with fewer, every cell is a reduction cell and the normal "
           f"cell is never searched), got {s.layers}")
    _check(s.stem_stride in (1, 2), "stem_stride", f"must be 1 or 2, got {s.stem_stride}")
    if s.images is not None:
        _check(s.images >= 4, "images", f"must be >= 4 or null, got {s.images}")
    _check(s.device in ("auto", "cpu", "cuda") or str(s.device).startswith("cuda:"), "device",
           f"must be auto, cpu, cuda or cuda:N, got '{s.device}'")


PRESETS = ("paper", "small")


def load_settings(overrides: list[str]) -> DictConfig:
    """Defaults, then a preset (``arch_search=small``), then ``arch_search.KEY=VALUE``; checked."""
    s = load_group(ArchSearchConfig, "arch_search", PRESETS, overrides,
                   usage="expected arch_search=PRESET or arch_search.KEY=VALUE")
    validate_arch_search(s)
    return s
