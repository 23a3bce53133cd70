"""scikit-learn's bundled 8×8 digits: a real data set that needs no download, for tests and quick runs."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.utils.data import Dataset
from kd_lightning.data.base import NO_AUGMENTATION, KDDataModule, TensorImageDataset
from kd_lightning.data.views import CropFlipViews, ViewedTransform

TEST_FRACTION = 0.2
# The train/test cut is fixed, independent of `seed`, so test accuracy is comparable across runs and seeds.
SPLIT_SEED = 0


class DigitsDataModule(KDDataModule):
    """1,797 8×8 grey digits, 10 classes: a stratified 80/20 train/test cut, then `val_fraction` of train."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False,
                 val_fraction: float = 0.1, seed: int = 0, augment: bool = False,
                 train_subset: int | None = None, device_resident: bool | str = "auto", **mixing: float) -> None:
        super().__init__(batch_size, num_workers, pin_memory, val_fraction, seed, train_subset, device_resident,
                         **mixing)
        self.num_classes, self.in_channels, self.image_size = 10, 1, (8, 8)
        self.augment = bool(augment)
        self._splits: tuple[TensorImageDataset, TensorImageDataset] | None = None

    def _load(self) -> tuple[TensorImageDataset, TensorImageDataset]:
        if self._splits is None:
            from sklearn.datasets import load_digits
            from sklearn.model_selection import train_test_split

            digits = load_digits()
            images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixels are 0..16
            targets = torch.tensor(digits.target, dtype=torch.long)
            train_idx, test_idx = train_test_split(torch.arange(len(targets)).numpy(), test_size=TEST_FRACTION,
                                                   stratify=digits.target, random_state=SPLIT_SEED)
            train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
            # Statistics of the fixed training cut, not of the `seed`-dependent val split, so they never move.
            mean, std = images[train_idx].mean().item(), images[train_idx].std().item()
            self._splits = (TensorImageDataset(images[train_idx], targets[train_idx], [mean], [std]),
                            TensorImageDataset(images[test_idx], targets[test_idx], [mean], [std]))
        return self._splits

    def load_train_pool(self) -> Dataset:
        return self._load()[0]

    def load_test(self) -> Dataset:
        return self._load()[1]

    def train_pool_size(self) -> int:
        return 1797 - math.ceil(1797 * TEST_FRACTION)  # train_test_split rounds the test size up

    @property
    def train_views(self) -> CropFlipViews:
        if not self.augment:
            return NO_AUGMENTATION
        # Shifts of one pixel (RandomCrop(8, padding=1)), no flip: about what 8×8 digits tolerate.
        return CropFlipViews(pad=1, flip=False, fill=self.pad_fill)

    @property
    def pad_fill(self) -> float:
        # Images are normalised already, so the padding takes the normalised value of a blank pixel rather than 0.
        train = self._load()[0]
        return float(-train.mean.flatten()[0] / train.std.flatten()[0])  # type: ignore[union-attr]

    def train_transform(self) -> Callable[[Any], Any] | None:
        return ViewedTransform(self.train_views) if self.augment else None


__all__ = ["DigitsDataModule"]
