"""Named augmentation views: the pad-crop (+ horizontal flip) of the small-image recipes, one integer per view.

A view is `(dy, dx, flipped)`: the top-left corner of the crop in the image padded by `pad` on every side
(`0 <= dy, dx <= 2 * pad`), and whether the crop is mirrored left-right. CIFAR's recipe (pad 4, flip) has
9 · 9 · 2 = 162 views; digits' one-pixel shift (pad 1, no flip) has 9. Naming the view lets an exact
teacher-output cache key on (sample, view) ("consistent teaching", Beyer et al. 2022) and lets a device-side
pipeline apply exactly the augmentation of the torchvision transforms.

`crop_flip` is the one implementation of a view, on a batch, so the DataLoader path (`ViewedTransform`) and any
device pipeline give the same pixels. Views are drawn uniformly, which is the distribution of torchvision's
`RandomCrop(size, padding=pad)` (independent uniform offsets) followed by `RandomHorizontalFlip(0.5)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class CropFlipViews:
    """The views of a pad-`pad` crop of the original size, with or without a left-right flip.

    `fill` is the padding value, per channel or one for all, in the scale of the images `crop_flip` is given
    (0 for uint8 or [0, 1] images, as torchvision pads before normalising).
    """

    pad: int
    flip: bool = True
    fill: float | tuple[float, ...] = 0.0

    @property
    def offsets(self) -> int:
        return 2 * self.pad + 1

    @property
    def count(self) -> int:
        return self.offsets ** 2 * (2 if self.flip else 1)

    @property
    def identity(self) -> int:
        """The view that returns the image unchanged (centred crop, not flipped)."""
        return self.encode(self.pad, self.pad, False)

    def encode(self, dy: Any, dx: Any, flipped: Any) -> Any:
        """Works on ints and on integer tensors alike."""
        position = dy * self.offsets + dx
        return position * 2 + flipped if self.flip else position

    def decode(self, view: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        view = torch.as_tensor(view, dtype=torch.long)
        if self.flip:
            position, flipped = view // 2, (view % 2).bool()
        else:
            position, flipped = view, torch.zeros_like(view, dtype=torch.bool)
        return position // self.offsets, position % self.offsets, flipped

    def draw(self, n: int, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        return torch.randint(self.count, (n,), generator=generator, device=device)

    def crop_flip(self, images: Tensor, views: Tensor, check: bool = True) -> Tensor:
        """`images[i]` (N×C×H×W, any dtype) seen through `views[i]`, on the images' device. `check=False` skips
        the range check, which reads the views back from the device (for views `draw` made)."""
        n, channels, height, width = images.shape
        views = torch.as_tensor(views, device=images.device).reshape(-1)
        if len(views) != n:
            raise ValueError(f"one view per image expected, got {len(views)} views for {n} images")
        if check and (int(views.min()) < 0 or int(views.max()) >= self.count):
            raise ValueError(f"views must lie in [0, {self.count}), got [{int(views.min())}, {int(views.max())}]")
        padded = self._pad(images)
        dy, dx, flipped = self.decode(views)
        rows = dy[:, None] + torch.arange(height, device=images.device)
        cols = dx[:, None] + torch.arange(width, device=images.device)
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
        # One gather over the flattened padded pixels (advanced indexing around the channel slice is ~50×
        # slower on the CPU); the result is N×C×H×W and contiguous.
        pixels = (rows[:, :, None] * padded.shape[3] + cols[:, None, :]).reshape(n, 1, height * width)
        seen = padded.reshape(n, channels, -1).gather(2, pixels.expand(n, channels, height * width))
        return seen.reshape(n, channels, height, width)

    def _pad(self, images: Tensor) -> Tensor:
        if self.pad == 0:
            return images
        fill = self.fill if isinstance(self.fill, Sequence) else (self.fill,)
        if len(fill) == 1:
            return F.pad(images, (self.pad,) * 4, value=float(fill[0]))
        if len(fill) != images.shape[1]:
            raise ValueError(f"fill has {len(fill)} values for {images.shape[1]} channels")
        padded = images.new_empty(images.shape[0], images.shape[1], images.shape[2] + 2 * self.pad,
                                  images.shape[3] + 2 * self.pad)
        padded.copy_(torch.tensor(fill, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
                     .expand_as(padded))
        padded[:, :, self.pad:-self.pad, self.pad:-self.pad] = images
        return padded


class ViewedTransform:
    """`to_tensor`, then a uniformly drawn view, then `after` (e.g. Normalize): returns `(image, view)`.

    The view is drawn from torch's global generator, which Lightning seeds per worker, like torchvision's.
    """

    def __init__(self, views: CropFlipViews, to_tensor: Callable[[Any], Tensor] | None = None,
                 after: Callable[[Tensor], Tensor] | None = None) -> None:
        self.views, self.to_tensor, self.after = views, to_tensor, after

    def __call__(self, image: Any) -> tuple[Tensor, int]:
        tensor = self.to_tensor(image) if self.to_tensor is not None else image
        view = int(self.views.draw(1)[0])
        seen = self.views.crop_flip(tensor.unsqueeze(0), torch.tensor([view]))[0]
        return (self.after(seen) if self.after is not None else seen), view


__all__ = ["CropFlipViews", "ViewedTransform"]
