"""Mixup and CutMix on the training batches, on the device, as timm's `Mixup` in its batch mode (DeiT's recipe).

Per batch (timm/data/mixup.py `Mixup._params_per_batch`, `_mix_batch`, `mixup_target`): with probability `mix_prob`
the batch is mixed, by CutMix with probability `switch_prob` when both are on; one λ ~ Beta(α, α) for the batch;
the batch is mixed with itself flipped (sample i with sample B−1−i); CutMix pastes one box of side
`int(H·sqrt(1−λ))` around a uniform centre (clipped at the border) and corrects λ to the unpasted area;
targets become `λ·onehot(y) + (1−λ)·onehot(flip(y))`, smoothed (`label_smoothing`: off-class value ε/K, on-class
1−ε+ε/K).

Every named input of a batch is mixed with the same λ, flip and box, the box scaled to each input's own size
(the box is drawn on the data's image size, where λ is corrected). Draws come from a generator seeded by (seed,
epoch, batch index, rank), so a resumed run replays them. Not timm: numpy's generator draws them (torch has no
Beta sampler that takes a generator; timm draws from numpy's global one), and a batch of odd size is mixed too
(timm asserts an even one; the flip pairs the middle sample with itself).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from kd_lightning.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MixOptions:
    """`data.mixup_alpha`, `data.cutmix_alpha` (0: off), `data.mix_prob`, `data.mix_switch_prob`,
    `data.label_smoothing` (of the mixed targets only). DeiT: 0.8, 1.0, 1.0, 0.5, 0.1."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if not (self.mixup_alpha >= 0 and self.cutmix_alpha >= 0 and 0 <= self.mix_prob <= 1
                and 0 <= self.switch_prob <= 1 and 0 <= self.label_smoothing < 1):
            raise ConfigError(
                f"data.mixup_alpha={self.mixup_alpha} and data.cutmix_alpha={self.cutmix_alpha} must be ≥ 0 (0 turns "
                f"each off), data.mix_prob={self.mix_prob} and data.mix_switch_prob={self.switch_prob} in [0, 1], and "
                f"data.label_smoothing={self.label_smoothing} in [0, 1). DeiT trains with 0.8, 1.0, 1.0, 0.5 and 0.1.")

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


@dataclasses.dataclass(frozen=True)
class MixDraw:
    """One batch's draw: `lam` weighs each sample's own target (after CutMix's correction); `box` is CutMix's
    (top, bottom, left, right) on an image of `size`, None for mixup; lam 1 and no box: the batch is not mixed."""

    lam: float
    box: tuple[int, int, int, int] | None = None
    size: tuple[int, int] | None = None


def mix_generator(seed: int, epoch: int, batch_index: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(batch_index), int(rank)])


def draw_mix(options: MixOptions, generator: np.random.Generator, size: tuple[int, int]) -> MixDraw:
    """timm's `_params_per_batch` and `cutmix_bbox_and_lam` (no min/max ratio, λ corrected), same draw order."""
    if not generator.random() < options.mix_prob:
        return MixDraw(1.0)
    if options.mixup_alpha > 0 and options.cutmix_alpha > 0:
        use_cutmix = bool(generator.random() < options.switch_prob)
    else:
        use_cutmix = options.cutmix_alpha > 0
    alpha = options.cutmix_alpha if use_cutmix else options.mixup_alpha
    lam = float(generator.beta(alpha, alpha))
    if not use_cutmix:
        return MixDraw(lam)
    height, width = size
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(generator.integers(0, height)), int(generator.integers(0, width))
    top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy + (cut_h + 1) // 2, 0), height)
    left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx + (cut_w + 1) // 2, 0), width)
    lam = 1.0 - (bottom - top) * (right - left) / float(height * width)
    return MixDraw(lam, (top, bottom, left, right), (height, width))


def mix_input(value: Tensor, draw: MixDraw) -> Tensor:
    """One input of the batch mixed with its flip: blended, or the box (scaled to this input's size) pasted."""
    if draw.box is None:
        if draw.lam == 1.0:
            return value
        return value * draw.lam + value.flip(0) * (1.0 - draw.lam)
    height, width = value.shape[-2:]
    scale_h, scale_w = height / draw.size[0], width / draw.size[1]
    top, bottom = round(draw.box[0] * scale_h), round(draw.box[1] * scale_h)
    left, right = round(draw.box[2] * scale_w), round(draw.box[3] * scale_w)
    mixed = value.clone()
    mixed[..., top:bottom, left:right] = value.flip(0)[..., top:bottom, left:right]
    return mixed


def mixed_targets(targets: Tensor, num_classes: int, lam: float, smoothing: float) -> Tensor:
    """timm's `mixup_target`: smoothed one-hot targets blended with their flip (B×K float)."""
    off = smoothing / num_classes
    one_hot = torch.full((len(targets), num_classes), off, device=targets.device)
    one_hot.scatter_(1, targets.long().view(-1, 1), 1.0 - smoothing + off)
    return one_hot * lam + one_hot.flip(0) * (1.0 - lam)


def mix_batch(batch: Any, options: MixOptions, num_classes: int, size: tuple[int, int],
              generator: np.random.Generator) -> Any:
    """A training batch `(inputs, targets, ...)` with its inputs (one tensor or {name: tensor}) mixed and its
    targets soft."""
    draw = draw_mix(options, generator, size)
    inputs = batch[0]
    if isinstance(inputs, Mapping):
        mixed: Any = {name: mix_input(value, draw) for name, value in inputs.items()}
    else:
        mixed = mix_input(inputs, draw)
    return (mixed, mixed_targets(batch[1], num_classes, draw.lam, options.label_smoothing), *batch[2:])


def soft_targets(targets: Tensor) -> bool:
    """Whether `targets` are class probabilities (a mixed batch's) rather than class indices."""
    return targets.ndim == 2 and targets.is_floating_point()


def hard_labels(targets: Tensor) -> Tensor:
    """Class indices: the targets themselves, or a mixed batch's dominant class (the larger of its two labels'
    weights), for the losses that read one class per sample (DKD's target mask, OFA's target enhancement)."""
    return targets.argmax(1) if soft_targets(targets) else targets
