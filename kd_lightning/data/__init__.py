"""Data modules: every batch is `(inputs, targets, indices, views)`, indices being positions in the batch's split;
`inputs` is one tensor, or a dict name → tensor for a module whose samples carry named sources (mfeat).

See `base.py` for the contract and the `val_fraction` convention (0 validates on the test split).
"""

from kd_lightning.data.base import IndexedDataset, KDDataModule, TensorImageDataset
from kd_lightning.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from kd_lightning.data.digits import DigitsDataModule
from kd_lightning.data.imagenet import ImageNetDataModule
from kd_lightning.data.mfeat import MfeatDataModule
from kd_lightning.data.mnist import FashionMNISTDataModule, MNISTDataModule
from kd_lightning.data.synthetic import SyntheticDataModule

__all__ = [
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
    "IndexedDataset",
    "KDDataModule",
    "MNISTDataModule",
    "MfeatDataModule",
    "SyntheticDataModule",
    "TensorImageDataset",
]
