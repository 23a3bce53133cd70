"""The contract every data module follows: `(input, target, index, view)` batches and a seeded validation split.

`view` names the training augmentation a sample went through (`KDDataModule.train_views`: a pad-crop/flip
view as one integer, so a teacher-output cache can key on (index, view)); samples of a split without named
views (evaluation splits, augmentations that cannot be named, such as ImageNet's RandomResizedCrop) carry
`UNNAMED_VIEW`.

A sample may carry several named inputs (`sources`: UCI Multiple Features' six feature vectors), and a run may
derive views of them (`inputs.views`, `data/inputs.py`): then batches carry `{name: input}` and `{name: view}`
dicts and each network reads its own. `default_source` is what a network reads when the config names none
(`input_shape` and `in_channels` are its); a single-input module's one source is "image", and without named
views or roles its batches stay plain tensors.

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
from kd_lightning.data.inputs import InputView, NamedSamples, RoleInputs, check_named, parse_views, resize, view_shape
from kd_lightning.data.mixing import MixOptions, mix_batch, mix_generator
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
                 transform: Callable[[Any], Any] | None = None, fixed_view: int = UNNAMED_VIEW,
                 named: NamedSamples | None = None) -> None:
        self.base = base
        self.indices = None if indices is None else list(indices)
        self.transform = transform
        self.fixed_view = int(fixed_view)
        # Set when the run reads named inputs (`data/inputs.py`): samples become ({name: input}, ..., {name: view}).
        self.named = named

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int, Any]:
        image, target = self.raw(index)
        if self.named is not None:
            inputs, views = self.named(image, self.transform, self.fixed_view)
            return inputs, target, index, views
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

    `mixup_alpha`, `cutmix_alpha`, `mix_prob`, `mix_switch_prob`, `label_smoothing` mix the training batches on
    the device (`data/mixing.py`, timm's `Mixup` in batch mode; 0 alphas: off); their targets are then B×K class
    probabilities. Validation and test batches are never mixed.
    """

    num_classes: int
    in_channels: int
    image_size: tuple[int, int]

    def __init__(self, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                 val_fraction: float = 0.0, seed: int = 0, train_subset: int | None = None,
                 device_resident: bool | str = "auto", mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 mix_prob: float = 1.0, mix_switch_prob: float = 0.5, label_smoothing: float = 0.1) -> None:
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
        self.mixing = MixOptions(float(mixup_alpha), float(cutmix_alpha), float(mix_prob), float(mix_switch_prob),
                                 float(label_smoothing))
        self.train_set: IndexedDataset | None = None
        self.val_set: IndexedDataset | None = None
        self.test_set: IndexedDataset | None = None
        # The run's named inputs (`use_inputs`); None: every network reads the one input, as plain tensors.
        self.input_views: dict[str, InputView] | None = None
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
    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.in_channels, *self.image_size)

    @property
    def sources(self) -> dict[str, tuple[int, ...]]:
        """The inputs each sample carries, by name, with their per-sample shapes (several for paired modalities)."""
        return {self.default_source: tuple(self.input_shape)}

    @property
    def default_source(self) -> str:
        """The input a network reads when the run names none."""
        return "image"

    @property
    def pad_fill(self) -> float | tuple[float, ...]:
        """The value a crop pads with, in the scale of the split's stored tensors (for an `own` view of data that
        is served without augmentation): 0 for images converted and normalised later."""
        views = self.train_views
        return views.fill if views is not None else 0.0

    def _inputs(self) -> dict[str, InputView] | None:
        """The named inputs batches carry: the run's (`use_inputs`), else a module of several sources' own."""
        if self.input_views is None and len(self.sources) > 1:
            self.input_views = parse_views({}, self.sources, self.default_source)
        return self.input_views

    @property
    def named_inputs(self) -> bool:
        """Whether batches carry named inputs (a mapping name → tensor) rather than one tensor."""
        return self._inputs() is not None

    def input_shape_of(self, name: str | None) -> tuple[int, ...]:
        """The per-sample shape of input `name` (None: the default source), after any resize."""
        views = self._inputs() or parse_views({}, self.sources, self.default_source)
        name = self.default_source if name is None else name
        if name not in views:
            raise ConfigError(f"{type(self).__name__} has no input {name!r}; its inputs are {sorted(views)}. Name one "
                              f"of those, or define a view of one with inputs.views.{name}={{source: <input>, ...}}.")
        return view_shape(views[name], self.sources)

    def use_inputs(self, views: Any = None, roles: RoleInputs | None = None) -> None:
        """Serve the run's named inputs (`inputs.views`; `roles` are checked against them). Named inputs are on when
        the data has several sources, views are defined or a role names an input; otherwise batches stay plain."""
        roles = roles or RoleInputs()
        parsed = parse_views(views, self.sources, self.default_source)
        check_named(roles, parsed)
        if len(self.sources) == 1 and not views and not roles.any:
            self.input_views = None
        else:
            self.input_views = parsed
        for split in (self.train_set, self.val_set, self.test_set):
            if split is not None:
                split.named = self._named_samples(train=split is self.train_set)

    def _named_samples(self, train: bool) -> NamedSamples | None:
        if self._inputs() is None:
            return None
        views = self.train_views
        augmentation = None if views is None else dataclasses.replace(views, fill=self.pad_fill)
        return NamedSamples(self.input_views, self.default_source, augmentation, train)

    def example_input(self, batch_size: int = 2) -> Tensor | dict[str, Tensor]:
        """A random batch of the input shape (of every named input, when there are several), for probing
        feature shapes before any data is loaded."""
        if self._inputs() is None:
            return torch.randn(batch_size, *self.input_shape)
        return {name: torch.randn(batch_size, *self.input_shape_of(name)) for name in self._inputs()}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Resizes the inputs that ask for another size, then mixes a training batch (`mixing`), on the device
        the batch now lives on."""
        if self.input_views is not None and isinstance(batch[0], dict):
            sized = {name: view.size for name, view in self.input_views.items() if view.size is not None}
            if sized:
                inputs = {name: resize(value, sized[name]) if name in sized else value
                          for name, value in batch[0].items()}
                batch = (inputs, *batch[1:])
        trainer = self.trainer
        if not self.mixing.active or trainer is None or not trainer.training:
            return batch
        # The index of this batch in its epoch: Lightning counts it ready only after this hook, and restores the
        # count on resume, so a resumed run draws what the uninterrupted one drew.
        batch_index = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        generator = mix_generator(global_seed(), trainer.current_epoch, batch_index, trainer.global_rank)
        return mix_batch(batch, self.mixing, self.num_classes, self.mix_size, generator)

    @property
    def mix_size(self) -> tuple[int, int]:
        """The image size CutMix draws its box on (the default source's; other inputs get it scaled)."""
        shape = self.sources[self.default_source]
        return (int(shape[-2]), int(shape[-1])) if len(shape) == 3 else (1, 1)

    def check_mixing(self) -> None:
        """Refuse CutMix on inputs that are not images (a box needs two spatial dimensions)."""
        if self.mixing.cutmix_alpha > 0:
            flat = sorted(name for name, shape in self.sources.items() if len(shape) != 3)
            if flat:
                raise ConfigError(
                    f"data.cutmix_alpha={self.mixing.cutmix_alpha} pastes a box of one image into another, but "
                    f"{type(self).__name__}'s inputs {flat} are not images (shapes "
                    f"{[self.sources[name] for name in flat]}). Mix them with data.mixup_alpha alone "
                    f"(data.cutmix_alpha=0).")

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
        train.named, val.named, test.named = (self._named_samples(True), self._named_samples(False),
                                              self._named_samples(False))
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
        return IndexedDataset(train.base, indices, transform=train.transform, fixed_view=train.fixed_view,
                              named=train.named)

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
        if self.input_views is not None:
            # Named inputs may draw their own crops even from a split served without augmentation.
            stored.views, stored.named = views or dataclasses.replace(NO_AUGMENTATION, fill=0), self.input_views
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
           "check_positive", "split_sizes", "view_targets"]
