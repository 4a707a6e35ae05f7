"""Batched tensor augmentation: random crop with zero padding and horizontal flip.

Randomness comes from an explicit CPU ``torch.Generator`` (never the global
RNG), so a member's batches are reproducible and its state can be saved. The
trainer draws a whole epoch's offsets and flips at once (:func:`draw_crop_flip`),
moves them to the device in one copy, and applies them batch by batch on the
device (:func:`crop_flip`), so no batch waits for the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["crop_flip", "draw_crop_flip", "random_crop_flip"]


def draw_crop_flip(n: int, padding: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row offsets, column offsets (in ``[0, 2 * padding]``) and flip flags for ``n`` images, on the CPU."""
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return dy, dx, flip


def crop_flip(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop image i of ``x`` at offset ``(dy[i], dx[i])`` of its zero-padded copy, then flip it where ``flip[i]``.

    One gather for the whole batch, on ``x``'s device (the offsets must be there too).
    """
    n, c, h, w = x.shape
    device = x.device
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        chan = torch.arange(c, device=device)[None, :, None, None]
        x = padded[batch, chan, rows, cols]
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Crop every image at a random offset of its zero-padded copy, then flip half of them."""
    dy, dx, flip = (t.to(x.device) for t in draw_crop_flip(len(x), padding, generator))
    return crop_flip(x, dy, dx, flip, padding)
