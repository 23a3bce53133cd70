"""CIFAR-10/100 from torchvision's on-disk python-pickle layout, with the standard distillation augmentation.

Layout: `<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}` and
`<root>/cifar-100-python/{train,test,meta}`, i.e. the official tarballs unpacked.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from kd_lightning.data.base import KDDataModule
from kd_lightning.data.device import ResidentSplit
from kd_lightning.data.views import CropFlipViews, ViewedTransform
from kd_lightning.errors import ConfigError


class _ExistenceCheck:
    """Mixin for torchvision's CIFAR classes: check that the files exist instead of checking their md5 sums.

    The md5 check would reject every file but the official ones, so tests could not use tiny files written
    in the same format, and it costs a full read of ~180 MB at every start. A truncated or foreign file
    still fails loudly when unpickled. Downloads keep their archive checksum (`download()` is unchanged).
    """

    root: str
    base_folder: str
    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, str]

    def _check_integrity(self) -> bool:
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, name))
                   for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        if not os.path.isfile(path):
            raise RuntimeError(f"Dataset metadata file {path} not found")
        with open(path, "rb") as infile:
            self.classes = pickle.load(infile, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class CIFAR10Files(_ExistenceCheck, datasets.CIFAR10):
    pass


class CIFAR100Files(_ExistenceCheck, datasets.CIFAR100):
    pass


class _CIFARDataModule(KDDataModule):
    dataset_cls: ClassVar[type[datasets.CIFAR10]]
    title: ClassVar[str]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]

    def __init__(self, root: str = "data", batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False,
                 val_fraction: float = 0.0, seed: int = 0, download: bool = False,
                 train_subset: int | None = None, device_resident: bool | str = "auto", **mixing: float) -> None:
        super().__init__(batch_size, num_workers, pin_memory, val_fraction, seed, train_subset, device_resident,
                         **mixing)
        self.in_channels, self.image_size = 3, (32, 32)
        self.root = Path(root).expanduser()
        self.download = bool(download)

    @property
    def data_dir(self) -> Path:
        return self.root / self.dataset_cls.base_folder

    def expected_files(self) -> list[str]:
        cls = self.dataset_cls
        return [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

    def check_files(self) -> None:
        missing = [name for name in self.expected_files() if not (self.data_dir / name).is_file()]
        if missing:
            raise ConfigError(f"{self.title} files not found: {', '.join(missing)} missing from "
                              f"{self.data_dir.resolve()} (expected {', '.join(self.expected_files())}, the python "
                              f"version of {self.title} as unpacked from {self.dataset_cls.filename}). To fix: "
                              f"point data.root at the directory that contains {self.dataset_cls.base_folder}/, "
                              f"or set data.download=true to fetch it (needs internet).")

    def prepare_data(self) -> None:
        if self.download:
            try:
                self.dataset_cls(str(self.root), train=True, download=True)
            except Exception as error:  # network failures surface as URLError/RuntimeError
                raise ConfigError(f"Downloading {self.title} into {self.root.resolve()} failed ({error}). "
                                  f"data.download=true needs internet access; without it, unpack "
                                  f"{self.dataset_cls.filename} into {self.root.resolve()} by hand.") from error
        self.check_files()

    def _load(self, train: bool) -> Dataset:
        self.check_files()
        try:
            return self.dataset_cls(str(self.root), train=train, download=False)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, RuntimeError) as error:
            raise ConfigError(f"{self.title} files in {self.data_dir.resolve()} could not be read ({error!r}). "
                              f"Unpack {self.dataset_cls.filename} there again, or set data.download=true.") from error

    def load_train_pool(self) -> Dataset:
        return self._load(train=True)

    def load_test(self) -> Dataset:
        return self._load(train=False)

    @property
    def train_views(self) -> CropFlipViews:
        # The augmentation of the CIFAR distillation benchmarks (CRD/RepDistiller: RandomCrop(32, padding=4),
        # RandomHorizontalFlip), so numbers are comparable; padding is black, before normalisation.
        return CropFlipViews(pad=4, flip=True, fill=0.0)

    def train_transform(self) -> Callable[[Any], Any]:
        return ViewedTransform(self.train_views, transforms.ToTensor(), transforms.Normalize(self.mean, self.std))

    def stored_split(self, base: Dataset) -> ResidentSplit | None:
        if not isinstance(base, datasets.CIFAR10):  # CIFAR-100's class derives from it
            return super().stored_split(base)
        images = torch.from_numpy(base.data).permute(0, 3, 1, 2).contiguous()  # N×H×W×C uint8 → N×C×H×W
        return ResidentSplit(images, torch.as_tensor(base.targets, dtype=torch.long),
                             torch.tensor(self.mean).view(1, 3, 1, 1), torch.tensor(self.std).view(1, 3, 1, 1))

    def test_transform(self) -> Callable[[Any], Any]:
        return transforms.Compose([transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 32×32 RGB, 10 classes, files in `<root>/cifar-10-batches-py/`."""

    dataset_cls = CIFAR10Files
    title = "CIFAR-10"
    num_classes = 10
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels): 32×32 RGB, 100 classes, files in `<root>/cifar-100-python/`."""

    dataset_cls = CIFAR100Files
    title = "CIFAR-100"
    num_classes = 100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


__all__ = ["CIFAR100DataModule", "CIFAR100Files", "CIFAR10DataModule", "CIFAR10Files"]
