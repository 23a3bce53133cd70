"""A training loader that a mid-epoch checkpoint resumes exactly: same epoch order, next batch first.

Lightning saves `state_dict()` of a train loader that has one (in the checkpoint's `loops.fit_loop.state_dict
.combined_loader`) and hands it back to `load_state_dict` before the resumed epoch starts. The order is a
permutation seeded by (seed, epoch) as in DistributedSampler, so it never depends on the global RNG that
augmentation, dropout and CRD's negative sampling advance; and since the sampler *is* a DistributedSampler,
Lightning keeps it under DDP rather than swapping in its own, and each rank resumes its own shard.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def global_seed() -> int:
    """The seed `seed_everything` set (Lightning's DistributedSampler reads the same variable)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class EpochPermutationSampler(DistributedSampler):
    """DistributedSampler's per-epoch order (this rank's share of a permutation seeded by seed + epoch)
    that can start part-way through an epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # resumed from an end-of-epoch checkpoint: the next epoch starts at its beginning
            self.skip = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())[self.skip:]
        self.skip = 0
        return iter(order)

    # The position interface `ResumableLoader` reads (CS-KD's ClassPairBatchSampler has the same, in batches).
    def current_epoch(self) -> int:
        return int(self.epoch)

    def pending_skip(self) -> int:
        return self.skip

    def resume_at(self, epoch: int, samples: int) -> None:
        self.set_epoch(epoch)
        self.skip = int(samples)


class ResumableLoader(DataLoader):
    """A DataLoader whose state is (epoch, batches delivered this epoch), over an `EpochPermutationSampler`
    or a batch sampler with the same position interface (`current_epoch`, `pending_skip`, `resume_at`; CS-KD's
    class pairs), which counts what it skips in batches rather than samples.

    Iteration starts lazily, at the first batch, so the epoch Lightning sets just before it is the one used.
    Worker seeds come from the loader's own generator, seeded per epoch, so creating the iterator draws
    nothing from the global RNG (a resumed run would otherwise draw once more than the uninterrupted one).
    """

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(dataset, *args, **kwargs)
        self.batches_delivered = 0

    def _position(self) -> tuple[Any, int]:
        """(what knows the epoch and can skip, samples per skipped unit); (None, 1) when Lightning swapped the
        sampler for its own (overfit_batches): a plain loader then."""
        if hasattr(self.batch_sampler, "resume_at"):
            return self.batch_sampler, 1
        if isinstance(self.sampler, EpochPermutationSampler):
            return self.sampler, self.batch_size
        return None, 1

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        position, unit = self._position()
        self.batches_delivered = 0
        if position is not None:
            self.generator.manual_seed(global_seed() + position.current_epoch())
            self.batches_delivered = position.pending_skip() // unit
        for batch in super().__iter__():
            self.batches_delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        position, _ = self._position()
        return {"epoch": position.current_epoch() if position is not None else 0,
                "batches_delivered": self.batches_delivered}

    def load_state_dict(self, state: dict[str, int]) -> None:
        position, unit = self._position()
        if position is not None:
            position.resume_at(state["epoch"], state["batches_delivered"] * unit)
