"""Training "batches" that are step records, not images: the batch source of data-free schemes.

A data-free student never sees a training image; an epoch is a configured number of student steps (the
references use 400). Served as a loader of `steps_per_epoch` records per rank — each record is one integer,
the step's position in the epoch across ranks — through `ResumableLoader`, so the progress bar, `max_epochs`,
checkpoints and mid-epoch resume work as for any scheme. The module turns (seed, epoch, record) into its
noise, so every rank draws its own and a resumed run draws the uninterrupted run's.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kd_lightning.data.resumable import EpochPermutationSampler, ResumableLoader, global_seed


class StepRecords(Dataset):
    def __init__(self, count: int) -> None:
        self.count = int(count)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Tensor:
        return torch.tensor(index, dtype=torch.long)


def step_record_loader(steps_per_epoch: int, world_size: int = 1, rank: int = 0) -> ResumableLoader:
    """`steps_per_epoch` one-record batches for this rank; record r of an epoch goes to rank r mod world_size."""
    records = StepRecords(int(steps_per_epoch) * int(world_size))
    sampler = EpochPermutationSampler(records, num_replicas=world_size, rank=rank, shuffle=False, seed=global_seed())
    return ResumableLoader(records, batch_size=1, sampler=sampler)


def step_seed(seed: int, epoch: int, record: int) -> int:
    """One 63-bit seed per (run seed, epoch, record): distinct across ranks, epochs and steps."""
    return (int(seed) * 1_000_003 + int(epoch)) * 4_000_037 + int(record) & (2**63 - 1)
