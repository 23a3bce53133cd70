"""Class-wise pair batches for CS-KD (Yun et al., "Regularizing Class-wise Predictions via Self-knowledge
Distillation", CVPR 2020): the first half of every batch are anchors, the second half one sample of the
same class for each anchor (alinlab/cs-kd `PairBatchSampler`).

Partners are a pure function of (seed, epoch, anchor index), and the anchors' order one of (seed, epoch),
so a run resumed at any epoch draws the batches an uninterrupted run draws. Under DDP Lightning swaps the
anchor sampler for a `DistributedSampler` and keeps this batch sampler around it.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, Sampler

from kd_lightning.errors import ConfigError


def check_pair_batch_size(batch_size: int) -> int:
    if int(batch_size) < 2 or int(batch_size) % 2:
        raise ConfigError(f"data.batch_size={batch_size} cannot hold class-wise pairs: CS-KD fills half of every "
                          f"batch with anchors and half with a same-class partner of each, so the batch size must "
                          f"be an even number >= 2 (the reference's 128 anchors are data.batch_size=256).")
    return int(batch_size)


class EpochPermutation(Sampler[int]):
    """A shuffle of range(n) drawn from (seed, epoch) alone, so resuming at an epoch replays its order."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class ClassPairBatchSampler(BatchSampler):
    """Batches of `batch_size // 2` anchors from `sampler` followed by one same-class partner per anchor.

    A partner is another sample of the anchor's class (the reference may draw the anchor itself, with
    probability 1/class size; a class with a single sample pairs it with itself).
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, drop_last: bool, targets: Tensor,
                 seed: int = 0) -> None:
        super().__init__(sampler, check_pair_batch_size(batch_size) // 2, drop_last)
        self.pair_batch_size = int(batch_size)
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.seed, self.epoch = int(seed), 0
        self.skip, self.skip_epoch = 0, 0  # batches of epoch `skip_epoch` a resumed run has already trained on
        order = torch.argsort(self.targets, stable=True)
        counts = torch.bincount(self.targets)
        self._class_start = torch.cumsum(counts, 0) - counts  # members of class c: order[start_c : start_c + n_c]
        self._class_size = counts
        self._by_class = order
        self._rank_in_class = torch.empty_like(order)
        self._rank_in_class[order] = torch.arange(len(order)) - self._class_start[self.targets[order]]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def current_epoch(self) -> int:
        # Lightning calls set_epoch on the anchor sampler only (EpochPermutation, DistributedSampler), so its
        # epoch is the one that counts.
        return int(getattr(self.sampler, "epoch", self.epoch))

    def pending_skip(self) -> int:
        return self.skip if self.current_epoch() == self.skip_epoch else 0

    def resume_at(self, epoch: int, batches: int) -> None:
        """Leave out the first `batches` batches of `epoch` (a mid-epoch checkpoint's); other epochs start whole."""
        self.skip, self.skip_epoch = int(batches), int(epoch)

    def partners(self) -> Tensor:
        """This epoch's partner of every sample: uniform over the other members of its class."""
        epoch = self.current_epoch()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 7_919)
        size = self._class_size[self.targets]
        others = (size - 1).clamp(min=1)
        draw = (torch.rand(len(self.targets), generator=generator, dtype=torch.float64) * others).long()
        # Skip the sample's own slot so a partner is never the anchor (unless its class has one member).
        rank = draw + ((draw >= self._rank_in_class) & (size > 1)).long()
        return self._by_class[self._class_start[self.targets] + rank]

    def __iter__(self) -> Iterator[list[int]]:
        partners = self.partners().tolist()
        skip = self.pending_skip()
        self.skip = 0
        for position, anchors in enumerate(super().__iter__()):
            if position >= skip:
                yield anchors + [partners[index] for index in anchors]
