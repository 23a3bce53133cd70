"""Device-resident training batches for small images: the whole split on the training device, no workers.

A `ResidentSplit` holds the split as stored (uint8, or float for data sets that come as floats) with its
normalisation and its augmentation as named views (`CropFlipViews`). A batch is gathered by index and seen
through its views on the device, then converted and normalised there: the same pixels as the torchvision
transforms of the DataLoader path (pad with 0 and crop before `ToTensor` and `Normalize`), without per-sample
Python, worker processes or host-to-device copies of images.

`DeviceBatches` draws the index order from the same samplers as the DataLoader path (`EpochPermutationSampler`,
or CS-KD's `ClassPairBatchSampler`), so its order, DDP shard and (epoch, batches delivered) state are theirs,
and a mid-epoch checkpoint resumes it exactly. The views of an epoch come from a generator seeded by
(seed, epoch, rank) alone, one fixed-size draw per epoch, so a resumed epoch replays them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from kd_lightning.data.inputs import InputView
from kd_lightning.data.resumable import EpochPermutationSampler
from kd_lightning.data.views import CropFlipViews
from kd_lightning.errors import ConfigError

# "auto" keeps a split on a GPU when it takes at most this fraction of the device's free memory.
AUTO_FREE_MEMORY_FRACTION = 0.25


def parse_device_resident(value: Any) -> bool | str:
    text = str(value).lower()
    if text in ("auto", "true", "false"):
        return "auto" if text == "auto" else text == "true"
    raise ConfigError(f"data.device_resident must be auto, true or false, got {value!r}. auto keeps small-image "
                      f"training splits on a CUDA device when they fit; true also does so on the CPU; false always "
                      f"loads through a DataLoader.")


@dataclass
class ResidentSplit:
    """A training split as stored, N×C×H×W, with what turns a stored image into a network input."""

    images: Tensor
    targets: Tensor
    mean: Tensor | None = None  # 1×C×1×1 float32, applied after uint8 images are scaled to [0, 1]
    std: Tensor | None = None
    views: CropFlipViews | None = None
    channels_last: bool = False
    # The run's named inputs of this (single-source) split, when it has any: see `data/inputs.py`.
    named: dict[str, InputView] | None = None

    def to(self, device: torch.device) -> "ResidentSplit":
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return ResidentSplit(move(self.images), move(self.targets), move(self.mean), move(self.std), self.views,
                             self.channels_last, self.named)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.targets.numel() * 8

    def inputs(self, indices: Tensor, views: Tensor | None, augmentation: CropFlipViews | None = None) -> Tensor:
        images = self.images.index_select(0, indices)
        augmentation = self.views if augmentation is None else augmentation
        if augmentation is not None and views is not None:
            # Views drawn by `CropFlipViews.draw` are in range; checking them would wait for the device.
            images = augmentation.crop_flip(images, views, check=False)
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        if self.mean is not None:
            images = (images - self.mean) / self.std
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether `auto` keeps a split of `nbytes` on `device`: CUDA devices only, within a fraction of free memory.
    On the CPU the DataLoader path already reads from memory, so `auto` leaves it (and CPU results) unchanged."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= AUTO_FREE_MEMORY_FRACTION * free


def view_seed(seed: int, epoch: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch)) * 1_009 + int(rank)


class DeviceBatches:
    """Training batches `(images, targets, indices, views)` gathered from a `ResidentSplit` on its device.

    Order from `sampler` (samples) or `batch_sampler` (batches with the position interface: class pairs);
    Lightning calls `set_epoch` on either, as on a DataLoader's. `state_dict` is `ResumableLoader`'s.
    """

    def __init__(self, split: ResidentSplit, batch_size: int, sampler: EpochPermutationSampler | None = None,
                 batch_sampler: Any = None, seed: int = 0, rank: int = 0) -> None:
        if (sampler is None) == (batch_sampler is None):
            raise ValueError("DeviceBatches takes either a sampler or a batch sampler")
        self.split, self.batch_size = split, int(batch_size)
        self.sampler, self.batch_sampler = sampler, batch_sampler
        self.seed, self.rank = int(seed), int(rank)
        self.batches_delivered = 0

    def _position(self) -> tuple[Any, int]:
        """(what knows the epoch and can skip, samples per skipped unit), as in ResumableLoader."""
        return (self.batch_sampler, 1) if self.batch_sampler is not None else (self.sampler, self.batch_size)

    def __len__(self) -> int:
        if self.batch_sampler is not None:
            return len(self.batch_sampler)
        return math.ceil(len(self.sampler) / self.batch_size)  # type: ignore[arg-type]

    def _epoch_batches(self) -> list[list[int]]:
        if self.batch_sampler is not None:
            return list(self.batch_sampler)
        order = list(self.sampler)  # type: ignore[arg-type]
        return [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
        position, unit = self._position()
        epoch = position.current_epoch()
        self.batches_delivered = position.pending_skip() // unit
        batches = self._epoch_batches()  # the samplers leave out what a resumed epoch delivered already
        device = self.split.images.device
        # One draw of a fixed size per epoch, for every slot of the epoch, so skipping replays the same views.
        slots = len(self) * self.batch_size
        first = self.batches_delivered * self.batch_size
        if self.split.views is not None:
            generator = torch.Generator(device=device).manual_seed(view_seed(self.seed, epoch, self.rank))
            views = self.split.views.draw(slots, generator, device)
        else:
            views = torch.zeros(slots, dtype=torch.long, device=device)  # the identity view of no augmentation
        draws = self._named_draws(views, slots, epoch, device) if self.split.named is not None else None
        order = torch.tensor([index for batch in batches for index in batch], dtype=torch.long).to(device)
        start = 0
        for batch in batches:
            indices = order[start:start + len(batch)]
            rows = slice(first + start, first + start + len(batch))
            start += len(batch)
            self.batches_delivered += 1
            targets = self.split.targets.index_select(0, indices)
            if draws is None:
                yield self.split.inputs(indices, views[rows]), targets, indices, views[rows]
                continue
            inputs = {name: self.split.inputs(indices, drawn[rows], augmentation)
                      for name, (augmentation, drawn) in draws.items()}
            yield inputs, targets, indices, {name: drawn[rows] for name, (_, drawn) in draws.items()}

    def _named_draws(self, shared: Tensor, slots: int, epoch: int,
                     device: torch.device) -> dict[str, tuple[CropFlipViews | None, Tensor]]:
        """Each named input's augmentation and its views for every slot of the epoch: the shared draw is the one
        an unnamed batch gets; an `own` input draws from a generator of its own, seeded by (seed, epoch, rank) and
        its position, so a resumed epoch replays it too."""
        assert self.split.named is not None
        draws = {}
        for position, (name, view) in enumerate(self.split.named.items(), start=1):
            augmentation = view.augmentation(self.split.views)
            if augmentation is None or view.draw == "shared":
                draws[name] = (augmentation, shared)
            elif view.draw == "none":
                draws[name] = (augmentation, torch.full_like(shared, augmentation.identity))
            else:
                generator = torch.Generator(device=device).manual_seed(
                    view_seed(self.seed, epoch, self.rank) + 104_729 * position)
                draws[name] = (augmentation, augmentation.draw(slots, generator, device))
        return draws

    def state_dict(self) -> dict[str, int]:
        position, _ = self._position()
        return {"epoch": position.current_epoch(), "batches_delivered": self.batches_delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        position, unit = self._position()
        position.resume_at(state["epoch"], state["batches_delivered"] * unit)


__all__ = ["AUTO_FREE_MEMORY_FRACTION", "DeviceBatches", "ResidentSplit", "fits_on", "parse_device_resident"]
