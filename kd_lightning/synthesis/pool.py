"""A bounded in-memory pool of synthetic images: a ring buffer on the images' device, never on disk
unless `save` is asked for (the references write every batch to an on-disk ImagePool)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from kd_lightning.errors import ConfigError


class SyntheticPool:
    """Holds the last `capacity` synthetic images (and their synthesis labels); the oldest go first.

    The buffer is allocated at the first `add` (its shape and device are the images'). `sample` draws
    with replacement from a torch.Generator, so the draws are a function of that generator's state;
    `state_dict` holds the buffer and the write position, so a restored pool samples identically.
    """

    def __init__(self, capacity: int) -> None:
        if int(capacity) <= 0:
            raise ConfigError(f"The synthetic pool's capacity must be a positive number of images, got {capacity}.")
        self.capacity = int(capacity)
        self.images: Tensor | None = None
        self.labels: Tensor | None = None
        self.count = 0
        self.position = 0

    def __len__(self) -> int:
        return self.count

    def add(self, images: Tensor, labels: Tensor | None = None) -> None:
        images = images.detach()[-self.capacity:]
        if labels is not None:
            labels = labels.detach()[-self.capacity:]
        if self.images is None:
            self.images = images.new_empty((self.capacity, *images.shape[1:]))
            self.labels = images.new_full((self.capacity,), -1, dtype=torch.long)
        if images.shape[1:] != self.images.shape[1:]:
            raise ConfigError(f"Synthetic images of shape {tuple(images.shape[1:])} cannot join a pool of "
                              f"{tuple(self.images.shape[1:])} images.")
        slots = (self.position + torch.arange(len(images), device=self.images.device)) % self.capacity
        self.images[slots] = images.to(self.images)
        self.labels[slots] = -1 if labels is None else labels.to(self.labels)
        self.position = (self.position + len(images)) % self.capacity
        self.count = min(self.count + len(images), self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`n` images and their labels (−1 where none was given), drawn uniformly with replacement on the
        generator's device (a CUDA generator draws without a host sync)."""
        if self.count == 0 or self.images is None or self.labels is None:
            raise RuntimeError("SyntheticPool.sample() before any add(): synthesise a batch first")
        index = torch.randint(self.count, (n,), generator=generator, device=generator.device).to(self.images.device)
        return self.images[index], self.labels[index]

    def to(self, device: torch.device | str) -> "SyntheticPool":
        if self.images is not None and self.labels is not None:
            self.images, self.labels = self.images.to(device), self.labels.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        filled = slice(0, self.count)
        return {"capacity": self.capacity, "count": self.count, "position": self.position,
                "images": None if self.images is None else self.images[filled].clone(),
                "labels": None if self.labels is None else self.labels[filled].clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity:
            raise ConfigError(f"The checkpoint's synthetic pool holds {state['capacity']} images, this run's "
                              f"{self.capacity}: resume with the pool capacity the checkpoint was trained with.")
        self.count, self.position = state["count"], state["position"]
        if state["images"] is None:
            self.images = self.labels = None
            return
        device = state["images"].device if self.images is None else self.images.device
        images, labels = state["images"].to(device), state["labels"].to(device)
        self.images = images.new_empty((self.capacity, *images.shape[1:]))
        self.labels = labels.new_full((self.capacity,), -1)
        self.images[: self.count], self.labels[: self.count] = images, labels

    def save(self, path: str | os.PathLike) -> None:
        """Write the pool's images and labels (CPU tensors) with torch.save, for inspection or reuse."""
        state = self.state_dict()
        torch.save({key: value.cpu() if isinstance(value, Tensor) else value for key, value in state.items()}, path)
