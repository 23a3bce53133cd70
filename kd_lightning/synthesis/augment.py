"""The random views synthesis optimises through, drawn from an explicit torch.Generator so a resumed
run draws the same ones. Draws happen on the generator's device and are applied on the images'."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def jitter_flip(images: Tensor, max_shift: int, flip: bool, generator: torch.Generator) -> Tensor:
    """DeepInversion's view: one circular shift of the whole batch by up to ±max_shift pixels per axis
    (torch.roll), then, if `flip`, a horizontal flip of the whole batch with probability ½."""
    shifts = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
    do_flip = bool(torch.rand((), generator=generator) < 0.5)
    view = torch.roll(images, shifts=(shifts[0], shifts[1]), dims=(2, 3)) if max_shift > 0 else images
    return torch.flip(view, dims=(3,)) if flip and do_flip else view


def crop_flip(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Per-sample random crop after zero padding, then a per-sample horizontal flip with probability ½
    (the kornia RandomCrop(padding)+RandomHorizontalFlip Fast-Datafree synthesises through)."""
    batch, _, height, width = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (batch, 2), generator=generator, device=generator.device)
    flips = torch.rand(batch, generator=generator, device=generator.device) < 0.5
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets, flips = offsets.to(images.device), flips.to(images.device)
    rows = offsets[:, 0, None] + torch.arange(height, device=images.device)
    cols = offsets[:, 1, None] + torch.arange(width, device=images.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    index = torch.arange(batch, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
