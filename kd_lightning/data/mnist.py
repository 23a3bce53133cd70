"""MNIST and Fashion-MNIST from torchvision's on-disk layout: the four IDX files in `<root>/<Name>/raw/`.

Missing files are recovered without a network where possible: `.gz` copies already in the raw folder, or in
`system_dir` (for Fashion-MNIST, where Debian's `dataset-fashion-mnist` package puts them), are unpacked in
place. Only `download=True` goes to the internet.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path
from typing import ClassVar

from torch.utils.data import Dataset
from torchvision import datasets

from kd_lightning.data.base import KDDataModule, TensorImageDataset
from kd_lightning.errors import ConfigError

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


def gunzip_atomic(source: Path, target: Path) -> None:
    # Unpack to a temporary name first: under DDP every rank may run this at once, and a reader must never
    # see a half-written file.
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as tmp:
        with gzip.open(source, "rb") as src:
            shutil.copyfileobj(src, tmp)
    os.replace(tmp.name, target)


class _IDXDataModule(KDDataModule):
    dataset_cls: ClassVar[type[datasets.MNIST]]
    title: ClassVar[str]
    mean: ClassVar[float]
    std: ClassVar[float]
    install_hint: ClassVar[str] = ""

    def __init__(self, root: str = "data", batch_size: int = 128, num_workers: int = 0, pin_memory: bool = False,
                 val_fraction: float = 0.0, seed: int = 0, download: bool = False,
                 system_dir: str | None = None, train_subset: int | None = None,
                 device_resident: bool | str = "auto", **mixing: float) -> None:
        super().__init__(batch_size, num_workers, pin_memory, val_fraction, seed, train_subset, device_resident,
                         **mixing)
        self.num_classes, self.in_channels, self.image_size = 10, 1, (28, 28)
        self.root = Path(root).expanduser()
        self.download = bool(download)
        self.system_dir = Path(system_dir).expanduser() if system_dir else None

    @property
    def raw_dir(self) -> Path:
        return self.root / self.dataset_cls.__name__ / "raw"  # torchvision's choice of folder name

    def _missing(self) -> list[str]:
        return [name for name in IDX_FILES if not (self.raw_dir / name).is_file()]

    def ensure_files(self, download: bool = False) -> None:
        missing = self._missing()
        if not missing:
            return
        sources = [self.raw_dir] + ([self.system_dir] if self.system_dir is not None else [])
        for name in missing:
            for source in sources:
                if (source / f"{name}.gz").is_file():
                    self.raw_dir.mkdir(parents=True, exist_ok=True)
                    gunzip_atomic(source / f"{name}.gz", self.raw_dir / name)
                    break
        missing = self._missing()
        if missing and download:
            try:
                for train in (True, False):
                    self.dataset_cls(str(self.root), train=train, download=True)
            except Exception as error:  # torchvision raises plain RuntimeError/URLError on network failure
                raise ConfigError(f"Downloading {self.title} into {self.raw_dir.resolve()} failed ({error}). "
                                  f"data.download=true needs internet access; without it, {self._place_hint()}"
                                  ) from error
            missing = self._missing()
        if missing:
            raise ConfigError(f"{self.title} files not found: {', '.join(missing)} missing from "
                              f"{self.raw_dir.resolve()} (expected {', '.join(IDX_FILES)}, or their .gz versions). "
                              f"To fix: {self._place_hint()}, or set data.download=true to fetch them (needs "
                              f"internet), or point data.root at the directory that contains "
                              f"{self.dataset_cls.__name__}/raw/.")

    def _place_hint(self) -> str:
        where = f" or in {self.system_dir}" if self.system_dir is not None else ""
        return (f"{self.install_hint}put the four IDX files (plain or .gz) in {self.raw_dir.resolve()}{where}")

    def prepare_data(self) -> None:
        self.ensure_files(download=self.download)

    def train_pool_size(self) -> int | None:
        labels = self.raw_dir / "train-labels-idx1-ubyte"
        if not labels.is_file():
            return None
        with open(labels, "rb") as f:
            header = f.read(8)  # magic (2049), then the big-endian sample count
        return int.from_bytes(header[4:8], "big") if len(header) == 8 else None

    def _load(self, train: bool) -> Dataset:
        self.ensure_files(download=False)
        try:
            ds = self.dataset_cls(str(self.root), train=train, download=False)
        except (RuntimeError, TypeError, ValueError) as error:
            raise ConfigError(f"{self.title} files in {self.raw_dir.resolve()} could not be read ({error}). "
                              f"Delete the damaged files so they are unpacked or downloaded again.") from error
        return TensorImageDataset(ds.data.unsqueeze(1), ds.targets, [self.mean], [self.std])

    def load_train_pool(self) -> Dataset:
        return self._load(train=True)

    def load_test(self) -> Dataset:
        return self._load(train=False)


class MNISTDataModule(_IDXDataModule):
    """MNIST, 28×28 grey, 10 classes; files in `<root>/MNIST/raw/`."""

    dataset_cls = datasets.MNIST
    title = "MNIST"
    mean, std = 0.1307, 0.3081


class FashionMNISTDataModule(_IDXDataModule):
    """Fashion-MNIST, 28×28 grey, 10 classes; files in `<root>/FashionMNIST/raw/`, or taken from Debian's
    `dataset-fashion-mnist` package (`system_dir`) when that is installed."""

    dataset_cls = datasets.FashionMNIST
    title = "Fashion-MNIST"
    mean, std = 0.2860, 0.3530
    install_hint = "run `apt-get install dataset-fashion-mnist` (its files are unpacked from there automatically), or "

    def __init__(self, root: str = "data", batch_size: int = 128, num_workers: int = 0, pin_memory: bool = False,
                 val_fraction: float = 0.0, seed: int = 0, download: bool = False,
                 system_dir: str | None = FASHION_SYSTEM_DIR, train_subset: int | None = None,
                 device_resident: bool | str = "auto", **mixing: float) -> None:
        super().__init__(root, batch_size, num_workers, pin_memory, val_fraction, seed, download, system_dir,
                         train_subset, device_resident, **mixing)


__all__ = ["FASHION_SYSTEM_DIR", "FashionMNISTDataModule", "MNISTDataModule"]
