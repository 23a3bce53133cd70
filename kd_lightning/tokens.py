"""Token sequences of vision transformers as feature maps, so map-reading terms work between ViTs and CNNs.

A transformer block outputs B×N×C tokens: `num_prefix` prefix tokens (class, distillation, registers), then
the patch tokens in row-major order over the patch grid. A model that produces such taps records its layout
as `model.kd_token_layout = {"num_prefix": P, "grid": (h, w)}`; `FeatureTaps` reads it and hands every
term the patch tokens as a B×C×h×w map (prefix tokens dropped), converted in that one place. Terms then
meet a ViT tap exactly as they meet a CNN stage, and their own spatial-size rules apply unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from torch import Tensor

from kd_lightning.errors import ConfigError

LAYOUT_ATTRIBUTE = "kd_token_layout"


def split_tokens(tokens: Tensor, num_prefix: int) -> tuple[Tensor, Tensor]:
    """(prefix tokens B×P×C, patch tokens B×N×C) of a B×(P+N)×C sequence."""
    return tokens[:, :num_prefix], tokens[:, num_prefix:]


def tokens_to_map(patches: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """B×(h·w)×C patch tokens (row-major over the grid, as patch embeddings flatten them) → B×C×h×w."""
    batch, count, channels = patches.shape
    height, width = grid_hw
    if count != height * width:
        raise ConfigError(f"{count} patch tokens do not fill a {height}×{width} patch grid. The model's img_size and "
                          f"patch_size must match the images it is given: set img_size to the data's image size.")
    return patches.transpose(1, 2).reshape(batch, channels, height, width)


def token_grid(layout: Mapping[str, Any], count: int) -> tuple[int, int] | None:
    """The patch grid of a sequence of `count` tokens under `layout`, or None when it is not a token tap.

    The declared grid comes first; a model built with `dynamic_img_size` sees other sizes, whose square
    grids are recovered from the count (a non-square image of another size cannot be, and is not a map).
    """
    patches = count - int(layout["num_prefix"])
    height, width = layout["grid"]
    if patches == height * width:
        return height, width
    if layout.get("dynamic") and patches > 0 and math.isqrt(patches) ** 2 == patches:
        return math.isqrt(patches), math.isqrt(patches)
    return None


def as_feature_map(tensor: Tensor, layout: Mapping[str, Any] | None) -> Tensor:
    """A B×N×C token tap as a B×C×h×w map of its patch tokens; any other tensor unchanged."""
    if layout is None or tensor.dim() != 3:
        return tensor
    grid = token_grid(layout, tensor.shape[1])
    if grid is None:
        return tensor
    return tokens_to_map(split_tokens(tensor, int(layout["num_prefix"]))[1], grid)
