"""Batched tensor augmentation: random crop with zero padding and horizontal flip.

Randomness comes from an explicit CPU ``torch.Generator`` (never the global
RNG), so a member's batches are reproducible and its state can be saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["random_crop_flip"]


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Crop every image at a random offset of its zero-padded copy, then flip half of them."""
    n, c, h, w = x.shape
    device = x.device
    if padding > 0:
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(device)
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        chan = torch.arange(c, device=device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)
