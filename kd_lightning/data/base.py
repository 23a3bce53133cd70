"""The contract every data module follows: `(input, target, index, view)` batches and a seeded validation split.

`view` names the training augmentation a sample went through (`KDDataModule.train_views`: a pad-crop/flip
view as one integer, so a teacher-output cache can key on (index, view)); samples of a split without named
views (evaluation splits, augmentations that cannot be named, such as ImageNet's RandomResizedCrop) carry
`UNNAMED_VIEW`.

A sample's input may instead be a dict of named sources (`named_sources`; mfeat's six feature vectors): then
`sources` names them with their per-sample shapes, `default_source` is the one a network reads when the config
names none (`input_shape` and `in_channels` are its), batches carry a dict name → tensor, and `example_input`
is such a dict. Every module answers `sources` and `default_source`; a single-input module's one source is
"image", and its inputs stay plain tensors.

Validation split convention (`val_fraction`):
  * `val_fraction > 0`: that fraction of the training set is held out by a permutation seeded by `seed` (keep
    it fixed across a sweep so all runs share one split) and evaluated with the test-time transform;
    `train_size` shrinks accordingly.
  * `val_fraction == 0`: no hold-out; "validation" runs on the test split. This is the convention of the CIFAR
    distillation benchmarks (CRD, RepDistiller, ...), whose reported numbers are best/last test accuracy, so
    the default for the benchmark datasets is 0. Validation metrics are then test metrics: do not use them
    for model selection in work that claims a clean held-out evaluation (`validates_on_test` is then true,
    and searches refuse to run: `kd_lightning.sweeps.objective`).
  * Modules with a dedicated validation set (synthetic data, `load_val`) take no `val_fraction`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kd_lightning.data.device import DeviceBatches, ResidentSplit, fits_on, parse_device_resident
from kd_lightning.data.resumable import EpochPermutationSampler, ResumableLoader, global_seed
from kd_lightning.data.pairs import ClassPairBatchSampler, EpochPermutation
from kd_lightning.data.views import CropFlipViews, ViewedTransform
from kd_lightning.errors import ConfigError

# What a LightningModule's `train_batches` attribute names, and the data-module method that serves it:
# ordinary sample batches, same-class pair batches (CS-KD), or step records without images (data-free
# schemes, whose module says how many steps an epoch has in `steps_per_epoch`).
SAMPLES, CLASS_PAIRS, STEPS = "samples", "class_pairs", "steps"
BATCH_SOURCES = {SAMPLES: "sample_loader", CLASS_PAIRS: "class_pair_loader", STEPS: "step_loader"}
# The view of a sample whose augmentation has no name (see the module docstring).
UNNAMED_VIEW = -1
# The views of a training split without augmentation: one, the image itself.
NO_AUGMENTATION = CropFlipViews(pad=0, flip=False)


class IndexedDataset(Dataset):
    """A view of `base` (optionally a subset of it) whose samples are `(transform(image), target, index, view)`.

    `index` is the position in this view, not in `base`: distillation terms that keep one memory slot per
    training sample (CRD) need ids in `[0, train_size)`, whatever pool the split was cut from. `view` is the
    one a `ViewedTransform` drew, else `fixed_view` (0 for an unaugmented training split, `UNNAMED_VIEW`
    otherwise).
    """

    def __init__(self, base: Dataset, indices: Sequence[int] | None = None,
                 transform: Callable[[Any], Any] | None = None, fixed_view: int = UNNAMED_VIEW) -> None:
        self.base = base
        self.indices = None if indices is None else list(indices)
        self.transform = transform
        self.fixed_view = int(fixed_view)

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int, int]:
        image, target = self.raw(index)
        view = self.fixed_view
        if isinstance(self.transform, ViewedTransform):
            image, view = self.transform(image)
        elif self.transform is not None:
            image = self.transform(image)
        return image, target, index, view

    def raw(self, index: int) -> tuple[Any, Any]:
        """The untransformed `(image, target)` of sample `index` of this view."""
        return self.base[self.indices[index] if self.indices is not None else index]


class TensorImageDataset(Dataset):
    """In-memory `(image, target)` pairs: images `N×C×H×W`, kept as stored (uint8 or float).

    uint8 images are converted and normalised per sample, so a 60k-image set costs 47 MB rather than 188 MB
    of float32 in every worker.
    """

    def __init__(self, images: Tensor, targets: Tensor,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        if images.ndim != 4 or len(images) != len(targets):
            raise ValueError(f"images must be N×C×H×W with one target each, got {tuple(images.shape)} "
                             f"and {tuple(targets.shape)}")
        self.images = images
        self.targets = targets.long()
        channels = images.shape[1]
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if image.dtype == torch.uint8:
            image = image.float().div_(255)
        if self.mean is not None:
            image = (image - self.mean) / self.std
        return image, self.targets[index]


def split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    """(train, val) counts; shared by `setup` and the cheap pre-setup `train_size` so they always agree."""
    if val_fraction == 0:
        return n, 0
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ConfigError(f"data.val_fraction={val_fraction} leaves no training samples out of {n}. "
                          f"Use a value in [0, 1) small enough to keep some training data, or 0 to validate "
                          f"on the test split.")
    return n - n_val, n_val


class KDDataModule(L.LightningDataModule):
    """Base class: subclasses load the raw splits; this class splits, indexes and serves them.

    Subclasses set `num_classes`, `in_channels`, `image_size` (H, W) in `__init__` (or as class attributes)
    and implement `load_train_pool` / `load_test`, returning datasets of untransformed `(image, target)`
    pairs, plus `train_transform` / `test_transform`. `load_val` may return a dedicated validation set
    (synthetic data), in which case `val_fraction` must be 0. `train_pool_size` may return the size of the
    training pool without loading it, which makes `train_size` cheap before `setup`.

    `device_resident` (auto | true | false) serves training batches from the whole split on the training
    device (`data/device.py`) when the training pool is an in-memory tensor split (`stored_split`) and the
    training transform is expressible as views (`augment_views`, or no transform); `auto` does so on CUDA
    devices when the split fits, `true` everywhere (the CPU included), `false` never.
    """

    num_classes: int
    in_channels: int
    image_size: tuple[int, int]

    def __init__(self, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                 val_fraction: float = 0.0, seed: int = 0, train_subset: int | None = None,
                 device_resident: bool | str = "auto") -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ConfigError(f"data.batch_size must be a positive integer (per device), got {batch_size!r}.")
        if int(num_workers) < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers!r}; use 0 to load in the "
                              f"main process.")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}: it is the fraction "
                              f"of the training set held out for validation (0 validates on the test split).")
        if train_subset is not None and (int(train_subset) != train_subset or int(train_subset) < 1):
            raise ConfigError(f"data.train_subset must be a positive integer (training samples to keep) or null "
                              f"for the whole training split, got {train_subset!r}.")
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.train_subset = None if train_subset is None else int(train_subset)
        self.device_resident = parse_device_resident(device_resident)
        self.train_set: IndexedDataset | None = None
        self.val_set: IndexedDataset | None = None
        self.test_set: IndexedDataset | None = None
        # Stored in checkpoints only: logging would clash with the LightningModule's hparams on shared keys.
        self.save_hyperparameters(logger=False)

    # --- what subclasses provide -------------------------------------------------------------------------
    def load_train_pool(self) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} must implement load_train_pool()")

    def load_test(self) -> Dataset:
        raise NotImplementedError(f"{type(self).__name__} must implement load_test()")

    def load_val(self) -> Dataset | None:
        return None

    def train_transform(self) -> Callable[[Any], Any] | None:
        return None

    def test_transform(self) -> Callable[[Any], Any] | None:
        return None

    def train_pool_size(self) -> int | None:
        return None

    @property
    def train_views(self) -> CropFlipViews | None:
        """The named views of the training augmentation (`train_transform` draws them with a
        `ViewedTransform`), `NO_AUGMENTATION` for a split served as stored, None when the augmentation has
        no name (then a teacher-output cache cannot key on it)."""
        return NO_AUGMENTATION

    def augment_views(self) -> CropFlipViews | None:
        """`train_views` on the stored pixels, for the device path: both CIFAR's transforms (before
        normalising) and digits' blank fill pad a stored 0. None when the split is served as stored."""
        views = self.train_views
        return None if views is None or views.count == 1 else dataclasses.replace(views, fill=0)

    def stored_split(self, base: Dataset) -> ResidentSplit | None:
        """`base` as stored tensors with its normalisation, or None when it is not an in-memory tensor split."""
        if not isinstance(base, TensorImageDataset) or base.images.dtype not in (torch.uint8, torch.float32):
            return None
        channels = base.images.shape[1]
        mean = None if base.mean is None else base.mean.view(1, channels, 1, 1)
        std = None if base.std is None else base.std.view(1, channels, 1, 1)
        return ResidentSplit(base.images, base.targets, mean, std)

    # --- shapes, known before setup ----------------------------------------------------------------------
    # Whether a sample's input is a dict of named sources (`sources`) rather than one tensor; then batches carry
    # a dict name → B×... tensor and `example_input` is such a dict.
    named_sources: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-sample shape of the default source: what a network that names no source reads."""
        return (self.in_channels, *self.image_size)

    @property
    def sources(self) -> dict[str, tuple[int, ...]]:
        """The inputs a sample carries, name → per-sample shape. A single-input module has one, "image"."""
        return {self.default_source: self.input_shape}

    @property
    def default_source(self) -> str:
        """The source networks read when the config names none."""
        return "image"

    def input_shape_of(self, source: str) -> tuple[int, ...]:
        """The per-sample shape of `source`, refused with the available names when the module has no such input."""
        shapes = self.sources
        if source not in shapes:
            raise ConfigError(f"{type(self).__name__} has no input named {source!r}; its inputs are "
                              f"{', '.join(repr(name) for name in shapes)} (default {self.default_source!r}). Name one "
                              f"of them.")
        return shapes[source]

    def example_input(self, batch_size: int = 2) -> Tensor | dict[str, Tensor]:
        """A random batch of the input shape (a dict of one per source when samples carry named sources), for
        probing feature shapes before any data is loaded."""
        if self.named_sources:
            return {name: torch.randn(batch_size, *shape) for name, shape in self.sources.items()}
        return torch.randn(batch_size, *self.input_shape)

    @property
    def train_size(self) -> int:
        """Training samples after the validation split (what CRD-style memory banks are sized by)."""
        if self.train_set is not None:
            return len(self.train_set)
        pool = self.train_pool_size()
        if pool is not None:
            return self._subset_size(split_sizes(pool, self.val_fraction)[0])
        # No cheap count: load once now; `setup` keeps the result, so the trainer does not load it again.
        self.prepare_data()
        self.setup("fit")
        assert self.train_set is not None
        return len(self.train_set)

    @property
    def validates_on_test(self) -> bool:
        """Whether "validation" is the test split, so that selecting on val metrics fits the test set.
        Answered before `setup` from the options alone: a search refuses such a module without loading it."""
        if self.val_set is not None:
            return self.val_set is self.test_set
        return self.val_fraction == 0 and type(self).load_val is KDDataModule.load_val

    @property
    def train_targets(self) -> Tensor:
        """Labels of the training split, a 1-D long tensor indexed like the batches' sample indices (CRD
        draws each sample's negatives from the other classes with it). Loads the data if `setup` has not run."""
        if self.train_set is None:
            self.prepare_data()
            self.setup("fit")
        assert self.train_set is not None
        return view_targets(self.train_set)

    # --- Lightning hooks ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:  # idempotent: every stage and `train_size` share one load
            return
        pool = self.load_train_pool()
        test = IndexedDataset(self.load_test(), transform=self.test_transform())
        val_base = self.load_val()
        if val_base is not None:
            if self.val_fraction > 0:
                raise ConfigError(f"{type(self).__name__} has its own validation split; set data.val_fraction=0 "
                                  f"(got {self.val_fraction}).")
            train = IndexedDataset(pool, transform=self.train_transform(), fixed_view=self._fixed_train_view())
            val = IndexedDataset(val_base, transform=self.test_transform())
        elif self.val_fraction > 0:
            n = len(pool)  # type: ignore[arg-type]
            n_train, _ = split_sizes(n, self.val_fraction)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
            # Same pool, two views: held-out samples are evaluated without augmentation.
            train = IndexedDataset(pool, sorted(order[:n_train]), transform=self.train_transform(),
                                   fixed_view=self._fixed_train_view())
            val = IndexedDataset(pool, sorted(order[n_train:]), transform=self.test_transform())
        else:
            train = IndexedDataset(pool, transform=self.train_transform(), fixed_view=self._fixed_train_view())
            val = test
        self.train_set, self.val_set, self.test_set = self._take_subset(train), val, test

    def _fixed_train_view(self) -> int:
        views = self.train_views
        return views.identity if views is not None and views.count == 1 else UNNAMED_VIEW

    def _subset_size(self, n_train: int) -> int:
        if self.train_subset is None:
            return n_train
        if self.train_subset > n_train:
            raise ConfigError(f"data.train_subset={self.train_subset} exceeds the {n_train} training samples left "
                              f"after the validation split. Use a smaller value, or null for all of them.")
        return self.train_subset

    def _take_subset(self, train: IndexedDataset) -> IndexedDataset:
        """A seeded subset of the training view, cut after the validation split so held-out samples never
        enter it; a smaller subset with the same seed is a subset of a larger one (prefix of one permutation).
        Sample indices stay positions in the new view, so they lie in [0, train_subset)."""
        if self.train_subset is None:
            return train
        n = len(train)
        chosen = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))[:self._subset_size(n)]
        positions = sorted(chosen.tolist())
        indices = positions if train.indices is None else [train.indices[p] for p in positions]
        return IndexedDataset(train.base, indices, transform=train.transform, fixed_view=train.fixed_view)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested.")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=False,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        """The batches the training module names in `train_batches` (see BATCH_SOURCES; default: samples)."""
        source = getattr(getattr(self.trainer, "lightning_module", None), "train_batches", None) or SAMPLES
        if source not in BATCH_SOURCES:
            raise ConfigError(f"The training module asks for train_batches={source!r}; the data modules serve "
                              f"{sorted(BATCH_SOURCES)}.")
        return getattr(self, BATCH_SOURCES[source])()

    def sample_loader(self) -> DataLoader | DeviceBatches:
        """Training samples in the resumable per-epoch order, one shard per rank."""
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested.")
        resident = self.resident_train_split()
        if resident is not None:
            return self.device_batches(resident, pairs=False)
        trainer = self.trainer
        sampler = EpochPermutationSampler(self.train_set, num_replicas=trainer.world_size if trainer else 1,
                                          rank=trainer.global_rank if trainer else 0, seed=global_seed())
        return ResumableLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=False,
                               num_workers=self.num_workers, pin_memory=self.pin_memory,
                               persistent_workers=self.num_workers > 0)

    def resident_train_split(self, device: torch.device | None = None) -> ResidentSplit | None:
        """The training split on `device` (default: the trainer's), if `device_resident` and the module allow it."""
        assert self.train_set is not None
        trainer = self.trainer
        # overfit_batches needs a sampler Lightning can replace by a sequential one: a DataLoader's.
        if self.device_resident is False or (trainer is not None and trainer.overfit_batches):
            return None
        if device is None:
            device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        stored = self.stored_split(self.train_set.base)
        views = self.augment_views()
        if stored is None or (self.train_set.transform is not None and views is None):
            if self.device_resident is True:
                raise ConfigError(f"data.device_resident=true, but {type(self).__name__} cannot hold its training "
                                  f"split on the device: it needs an in-memory uint8/float tensor split whose "
                                  f"augmentation is a pad-crop/flip view. Set data.device_resident=false (or auto).")
            return None
        if self.device_resident == "auto" and not fits_on(device, stored.nbytes * len(self.train_set)
                                                          // len(stored.targets)):
            return None
        if self.train_set.indices is not None:
            chosen = torch.as_tensor(self.train_set.indices, dtype=torch.long)
            stored = ResidentSplit(stored.images[chosen], stored.targets[chosen], stored.mean, stored.std)
        stored.views = views
        return stored.to(device)

    def device_batches(self, split: ResidentSplit, pairs: bool) -> DeviceBatches:
        """The DataLoader path's order (and CS-KD's class pairs), sharded by rank here: Lightning shards
        DataLoaders only."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        assert self.train_set is not None
        if not pairs:
            sampler = EpochPermutationSampler(self.train_set, num_replicas=world, rank=rank, seed=global_seed())
            return DeviceBatches(split, self.batch_size, sampler=sampler, seed=global_seed(), rank=rank)
        anchors: Any = (EpochPermutation(len(self.train_set), self.seed) if world == 1 else
                        EpochPermutationSampler(self.train_set, num_replicas=world, rank=rank, seed=global_seed()))
        batch_sampler = ClassPairBatchSampler(anchors, self.batch_size, False, view_targets(self.train_set), self.seed)
        return DeviceBatches(split, self.batch_size, batch_sampler=batch_sampler, seed=global_seed(), rank=rank)

    def class_pair_loader(self) -> DataLoader | DeviceBatches:
        """Training batches of same-class pairs (CS-KD), asked for by a module with `train_batches = "class_pairs"`."""
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested.")
        resident = self.resident_train_split()
        if resident is not None:
            return self.device_batches(resident, pairs=True)
        sampler = ClassPairBatchSampler(EpochPermutation(len(self.train_set), self.seed), self.batch_size, False,
                                        view_targets(self.train_set), self.seed)
        return ResumableLoader(self.train_set, batch_sampler=sampler, num_workers=self.num_workers,
                               pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)

    def step_loader(self) -> DataLoader:
        """Step records without images (a data-free module's `steps_per_epoch` per rank): the real training
        split is never read."""
        from kd_lightning.data.steps import step_record_loader

        trainer = self.trainer
        return step_record_loader(trainer.lightning_module.steps_per_epoch, trainer.world_size, trainer.global_rank)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


def reads_source(model: nn.Module, source: str) -> nn.Module:
    """Make `model` read `source` from an input that is a dict of named sources (a named-sources batch or
    `example_input`), and anything else as it comes; returns `model`.

    A forward pre-hook rather than a change to the schemes, so every place a network is called (training,
    evaluation, tap-shape probes, FLOP counts) picks the same input while the module tree and state_dict stay
    those of the bare network. The name is kept as `model.kd_input`, where per-role input choices can read it.
    """
    model.kd_input = source
    if not getattr(model, "_reads_source_hooked", False):
        model.register_forward_pre_hook(_pick_named_source)
        model._reads_source_hooked = True
    return model


def _pick_named_source(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if not args or not isinstance(args[0], Mapping):
        return None
    inputs = args[0]
    if module.kd_input not in inputs:
        raise ConfigError(f"{type(module).__name__} reads the input {module.kd_input!r}, but the batch carries "
                          f"{', '.join(repr(name) for name in inputs)}. Name one of them.")
    return (inputs[module.kd_input], *args[1:])


def view_targets(view: IndexedDataset) -> Tensor:
    """The labels of `view` in its own order, from the base's `targets` (torchvision datasets, ImageFolder,
    TensorImageDataset) without touching the images; a base without one is read sample by sample."""
    positions = range(len(view.base)) if view.indices is None else view.indices  # type: ignore[arg-type]
    labels = getattr(view.base, "targets", None)
    if labels is None:
        return torch.tensor([int(view.base[i][1]) for i in positions], dtype=torch.long)
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    return labels if view.indices is None else labels[torch.as_tensor(view.indices, dtype=torch.long)]


def as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    """`32` or `[32, 32]` (a YAML list arrives as a ListConfig) → `(32, 32)`."""
    if isinstance(size, int):
        return (size, size)
    h, w = (int(s) for s in size)
    return (h, w)


def check_positive(name: str, value: Any) -> int:
    if int(value) < 1 or int(value) != value:
        raise ConfigError(f"data.{name} must be a positive integer, got {value!r}.")
    return int(value)


__all__ = ["NO_AUGMENTATION", "UNNAMED_VIEW", "IndexedDataset", "KDDataModule", "TensorImageDataset", "as_hw",
           "check_positive", "reads_source", "split_sizes", "view_targets"]
