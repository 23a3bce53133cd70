"""Random but learnable images, for smoke tests and throughput benchmarks that must not depend on any file.

Each class has a fixed smooth pattern (random at 4×4, upsampled, so convolutions and pooling keep it);
a sample is its class pattern times `signal` plus unit Gaussian noise. Everything is generated once from
`seed`, so runs are reproducible and a model can beat chance within a few steps. All splits live in memory:
`(train_size + val_size + test_size) × C × H × W × 4` bytes.

`paired_features=k` gives every sample a second, paired modality: `features`, a k-vector seen through a fixed
random projection of the same image (plus its own noise), next to `image` (named inputs, `data/inputs.py`): a
teacher on the image and a student on the features is a cross-modal pair that needs no files.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from kd_lightning.data.base import KDDataModule, TensorImageDataset, as_hw, check_positive
from kd_lightning.errors import ConfigError

PATTERN_RESOLUTION = 4


class PairedFeatures(Dataset):
    """`({"image": image, "features": vector}, target)` samples: two modalities of one scene."""

    def __init__(self, images: torch.Tensor, features: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.features, self.targets = images, features, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"image": self.images[index], "features": self.features[index]}, self.targets[index]


class SyntheticDataModule(KDDataModule):
    """Seeded class-pattern-plus-noise images with separate train/val/test sets of the given sizes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int | Sequence[int] = 32,
                 train_size: int = 512, val_size: int = 128, test_size: int = 128, batch_size: int = 64,
                 seed: int = 0, num_workers: int = 0, pin_memory: bool = False, signal: float = 1.0,
                 train_subset: int | None = None, device_resident: bool | str = "auto", paired_features: int = 0,
                 **mixing: float) -> None:
        super().__init__(batch_size, num_workers, pin_memory, val_fraction=0.0, seed=seed, train_subset=train_subset,
                         device_resident=device_resident, **mixing)
        self.num_classes = check_positive("num_classes", num_classes)
        self.in_channels = check_positive("in_channels", in_channels)
        self.image_size = as_hw(image_size)
        self.sizes = {"train": check_positive("train_size", train_size), "val": check_positive("val_size", val_size),
                      "test": check_positive("test_size", test_size)}
        self.signal = float(signal)
        if int(paired_features) < 0:
            raise ConfigError(f"data.paired_features must be >= 0 (0: images only), got {paired_features!r}.")
        self.paired_features = int(paired_features)
        self._splits: dict[str, Dataset] | None = None

    @property
    def sources(self) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {"image": tuple(self.input_shape)}
        if self.paired_features:
            shapes["features"] = (self.paired_features,)
        return shapes

    def _generate(self) -> dict[str, TensorImageDataset]:
        if self._splits is None:
            gen = torch.Generator().manual_seed(self.seed)
            coarse = torch.randn(self.num_classes, self.in_channels, PATTERN_RESOLUTION, PATTERN_RESOLUTION,
                                 generator=gen)
            patterns = F.interpolate(coarse, size=self.image_size, mode="bilinear", align_corners=False)
            patterns = patterns / patterns.flatten(1).std(dim=1).clamp_min(1e-6).view(-1, 1, 1, 1)
            # Drawn after the patterns, and only when asked for, so the image-only splits stay those of before.
            pixels = self.in_channels * self.image_size[0] * self.image_size[1]
            projection = (torch.randn(pixels, self.paired_features, generator=gen) / pixels ** 0.5
                          if self.paired_features else None)
            self._splits = {}
            for split, n in self.sizes.items():  # fixed order, so each split depends on the seed alone
                # Balanced labels (shuffled), so chance level really is 1 / num_classes.
                targets = torch.arange(n) % self.num_classes
                targets = targets[torch.randperm(n, generator=gen)]
                noise = torch.randn(n, self.in_channels, *self.image_size, generator=gen)
                images = self.signal * patterns[targets] + noise
                if self.paired_features:
                    features = images.flatten(1) @ projection + torch.randn(n, self.paired_features, generator=gen)
                    self._splits[split] = PairedFeatures(images, features, targets)
                else:
                    self._splits[split] = TensorImageDataset(images, targets)
        return self._splits

    def load_train_pool(self) -> Dataset:
        return self._generate()["train"]

    def load_val(self) -> Dataset:
        return self._generate()["val"]

    def load_test(self) -> Dataset:
        return self._generate()["test"]

    def train_pool_size(self) -> int:
        return self.sizes["train"]


__all__ = ["SyntheticDataModule"]
