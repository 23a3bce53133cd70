"""ImageNet (or any image-classification set) stored as two ImageFolder trees: `<root>/train/` and `<root>/val/`.

Each tree holds one folder per class (`train/n01440764/*.JPEG`, ...); class ids are the sorted folder names,
so `val/` must have the same folders as `train/`. The validation images therefore need to be sorted into
class folders (the official tarball ships them flat; the usual `valprep.sh` does the sorting). There is no
separate labelled test set, so `test` is `val`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from torch.utils.data import Dataset
from torchvision import datasets, transforms

from kd_lightning.data.base import KDDataModule, as_hw, check_positive
from kd_lightning.errors import ConfigError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LAYOUT = ("<root>/train/<class>/<image> and <root>/val/<class>/<image>, with the same class folder names in "
          "both")


class ImageNetDataModule(KDDataModule):
    """ImageFolder trees with the standard ImageNet transforms (`image_size`/`resize_size` shrink them for tests)."""

    def __init__(self, root: str = "data/imagenet", batch_size: int = 256, num_workers: int = 0,
                 pin_memory: bool = False, val_fraction: float = 0.0, seed: int = 0, num_classes: int = 1000,
                 image_size: int = 224, resize_size: int = 256, train_subset: int | None = None,
                 **mixing: float) -> None:
        super().__init__(batch_size, num_workers, pin_memory, val_fraction, seed, train_subset, **mixing)
        self.root = Path(root).expanduser()
        self.num_classes = check_positive("num_classes", num_classes)
        self.in_channels = 3
        self.image_size = as_hw(image_size)
        self.resize_size = check_positive("resize_size", resize_size)
        self._val: datasets.ImageFolder | None = None

    def _folder(self, split: str) -> datasets.ImageFolder:
        path = self.root / split
        if not path.is_dir():
            raise ConfigError(f"Image folder {path.resolve()} not found. {type(self).__name__} expects {LAYOUT}. "
                              f"Set data.root to the directory that holds train/ and val/.")
        try:
            folder = datasets.ImageFolder(str(path))
        except (FileNotFoundError, RuntimeError) as error:  # no class folders, or no images in them
            raise ConfigError(f"{path.resolve()} holds no usable images ({error}). {type(self).__name__} expects "
                              f"{LAYOUT}.") from error
        if len(folder.classes) != self.num_classes:
            raise ConfigError(f"{path.resolve()} has {len(folder.classes)} class folders but data.num_classes="
                              f"{self.num_classes}. Set data.num_classes={len(folder.classes)} to train on this "
                              f"folder, or point data.root at the full data set.")
        return folder

    def load_train_pool(self) -> Dataset:
        train = self._folder("train")
        val = self.load_test()
        if train.classes != val.classes:  # same count but other names would silently scramble the labels
            only = sorted(set(train.classes) ^ set(val.classes))[:5]
            raise ConfigError(f"The class folders of {self.root.resolve() / 'train'} and "
                              f"{self.root.resolve() / 'val'} differ (e.g. {', '.join(only)}). Both trees need "
                              f"the same class folder names so that labels agree.")
        return train

    def load_test(self) -> Dataset:
        if self._val is None:
            self._val = self._folder("val")
        return self._val

    @property
    def train_views(self) -> None:
        return None  # RandomResizedCrop's scales and aspect ratios are continuous: no finite set of views

    def train_transform(self) -> Callable[[Any], Any]:
        return transforms.Compose([transforms.RandomResizedCrop(self.image_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def test_transform(self) -> Callable[[Any], Any]:
        return transforms.Compose([transforms.Resize(self.resize_size), transforms.CenterCrop(self.image_size),
                                   transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


__all__ = ["ImageNetDataModule"]
