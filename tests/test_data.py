"""Data modules on tiny files written here in the real on-disk formats (nothing is downloaded)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd_lightning.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageNetDataModule,
    KDDataModule,
    MNISTDataModule,
    SyntheticDataModule,
)
from kd_lightning.data.base import NO_AUGMENTATION, UNNAMED_VIEW
from kd_lightning.data.resumable import EpochPermutationSampler
from kd_lightning.errors import ConfigError


# --- writers for the on-disk formats ---------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """IDX as in the MNIST distribution: magic 0x0000080N (uint8, N dims), big-endian dims, raw bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)


def write_mnist(raw: Path, n_train: int = 30, n_test: int = 12, gz: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(raw / (name + ".gz" if gz else name), array, gz=gz)
    return arrays


class Py2Str(bytes):
    """Pickled as a Python 2 `str`, as in the official CIFAR files: keys load as b"data" with
    encoding="bytes" (the CIFAR page's loader) and as "data" with encoding="latin1" (torchvision's)."""


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + bytes(obj))
        self.memoize(obj)

    dispatch[Py2Str] = save_py2str


def py2_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def write_cifar(root: Path, hundred: bool = False, per_batch: int = 8, n_test: int = 10, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    classes = 100 if hundred else 10
    label_key = Py2Str(b"fine_labels" if hundred else b"labels")
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    sizes = [per_batch * 5] if hundred else [per_batch] * 5
    written = {}
    for name, n in [*zip(names, sizes), ("test" if hundred else "test_batch", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, classes, n)]
        entry = {Py2Str(b"batch_label"): Py2Str(name.encode()), Py2Str(b"data"): data, label_key: labels}
        if hundred:
            entry[Py2Str(b"coarse_labels")] = [x // 5 for x in labels]
        py2_pickle(folder / name, entry)
        written[name] = (data, labels)
    if hundred:
        py2_pickle(folder / "meta", {Py2Str(b"fine_label_names"): [Py2Str(b"c%d" % i) for i in range(100)],
                                     Py2Str(b"coarse_label_names"): [Py2Str(b"k%d" % i) for i in range(20)]})
    else:
        py2_pickle(folder / "batches.meta", {Py2Str(b"label_names"): [Py2Str(b"c%d" % i) for i in range(10)],
                                             Py2Str(b"num_vis"): 3072})
    return written


def write_image_folder(root: Path, classes: list[str], per_class: int = 3, size: tuple[int, int] = (40, 48)) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"img{i}.png")


# --- shared checks ---------------------------------------------------------------------------------------
def check_batches(dm: KDDataModule, shape: tuple[int, ...], num_classes: int) -> None:
    """Every loader yields (float images, long targets, long indices, long views), indices a permutation of the
    split; training views are names of `train_views` (or unnamed without them), evaluation views unnamed."""
    dm.prepare_data()
    dm.setup("fit")
    named = dm.train_views
    for loader, n, training in [(dm.train_dataloader(), len(dm.train_set), True),
                                (dm.val_dataloader(), len(dm.val_set), False),
                                (dm.test_dataloader(), len(dm.test_set), False)]:
        seen = []
        for images, targets, indices, views in loader:
            assert images.dtype == torch.float32 and images.shape[1:] == shape
            assert targets.dtype == torch.long and indices.dtype == torch.long and views.dtype == torch.long
            assert len(images) == len(targets) == len(indices) == len(views) <= dm.batch_size
            if training and named is not None:
                assert 0 <= views.min() and views.max() < named.count
            else:
                assert (views == UNNAMED_VIEW).all()
            assert 0 <= targets.min() and targets.max() < num_classes
            seen.append(indices)
        assert sorted(torch.cat(seen).tolist()) == list(range(n))
    assert dm.train_size == len(dm.train_set)
    assert dm.example_input(3).shape == (3, *shape)
    assert (dm.in_channels, *dm.image_size) == shape and dm.num_classes == num_classes


# --- digits / synthetic ----------------------------------------------------------------------------------
def test_digits_split_sizes_and_batches():
    dm = DigitsDataModule(batch_size=256)
    assert dm.num_classes == 10 and dm.image_size == (8, 8) and dm.in_channels == 1
    assert dm.train_size == 1293  # known before setup: 1437 training digits less a 10% hold-out
    check_batches(dm, (1, 8, 8), 10)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1293, 144, 360)
    # The test cut is fixed; the hold-out follows `seed`.
    other = DigitsDataModule(seed=1)
    other.setup()
    assert torch.equal(other.test_set.base.targets, dm.test_set.base.targets)
    assert other.val_set.indices != dm.val_set.indices


def test_digits_val_fraction_zero_validates_on_test_and_augment_shifts():
    dm = DigitsDataModule(val_fraction=0, augment=True)
    dm.setup()
    assert dm.val_set is dm.test_set and dm.train_size == 1437
    torch.manual_seed(0)
    plain = dm.train_set.base[0][0]
    assert any(not torch.equal(dm.train_set[0][0], plain) for _ in range(10))
    # The named view reproduces the pixels: one-pixel shifts, blank padding, no flip (9 views).
    assert dm.train_views.count == 9 and not dm.train_views.flip
    for _ in range(10):
        image, _, index, view = dm.train_set[3]
        assert torch.equal(image, dm.train_views.crop_flip(dm.train_set.raw(index)[0][None], torch.tensor([view]))[0])
    assert DigitsDataModule().train_views == NO_AUGMENTATION and DigitsDataModule().train_views.count == 1


def test_synthetic_is_seeded_and_learnable():
    dm = SyntheticDataModule(num_classes=4, in_channels=2, image_size=[12, 10], train_size=80, val_size=24,
                             test_size=40, batch_size=16, seed=3)
    assert dm.train_size == 80 and dm.example_input().shape == (2, 2, 12, 10)
    check_batches(dm, (2, 12, 10), 4)
    train, test = dm.train_set.base, dm.test_set.base
    means = torch.stack([train.images[train.targets == c].mean(0) for c in range(4)])
    predicted = torch.cdist(test.images.flatten(1), means.flatten(1)).argmin(1)
    assert (predicted == test.targets).float().mean() > 0.6  # chance is 0.25
    again = SyntheticDataModule(num_classes=4, in_channels=2, image_size=[12, 10], train_size=80, val_size=24,
                                test_size=40, batch_size=16, seed=3)
    again.setup()
    assert torch.equal(again.train_set.base.images, train.images)


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.0)
    with pytest.raises(ConfigError, match="batch_size"):
        DigitsDataModule(batch_size=0)


def test_loader_settings():
    dm = SyntheticDataModule(train_size=8, val_size=4, test_size=4, batch_size=4, num_workers=1, pin_memory=False)
    dm.setup()
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.num_workers == 1 and loader.drop_last is False
    # Shuffled by a per-epoch seeded permutation (not the global RNG), so a mid-epoch resume is exact.
    assert isinstance(loader.sampler, EpochPermutationSampler) and loader.sampler.shuffle
    assert isinstance(dm.val_dataloader().sampler, torch.utils.data.SequentialSampler)


# --- MNIST / Fashion-MNIST -------------------------------------------------------------------------------
def test_mnist_reads_idx_files(tmp_path):
    arrays = write_mnist(tmp_path / "MNIST" / "raw")
    dm = MNISTDataModule(root=str(tmp_path), batch_size=8, val_fraction=0.2)
    assert dm.train_size == 24  # from the label file's header, before anything is loaded
    check_batches(dm, (1, 28, 28), 10)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (24, 6, 12)
    image, target, index, _ = dm.test_set[5]
    assert index == 5 and int(target) == arrays["t10k-labels-idx1-ubyte"][5]
    expected = (torch.from_numpy(arrays["t10k-images-idx3-ubyte"][5]).float() / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(image[0], expected)


def test_fashion_mnist_unpacks_system_files(tmp_path):
    system = tmp_path / "system"
    arrays = write_mnist(system, gz=True)
    dm = FashionMNISTDataModule(root=str(tmp_path / "data"), batch_size=16, system_dir=str(system))
    check_batches(dm, (1, 28, 28), 10)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(arrays)
    assert torch.equal(dm.train_set.base.targets, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    assert dm.val_set is dm.test_set and len(dm.test_set) == 12


def test_mnist_gz_files_in_raw_folder_are_unpacked(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw", gz=True)
    dm = MNISTDataModule(root=str(tmp_path), batch_size=8)
    dm.setup()
    assert len(dm.train_set) == 30 and (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()


def test_missing_idx_files_name_the_fix(tmp_path):
    dm = FashionMNISTDataModule(root=str(tmp_path), system_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message and "data.download=true" in message
    assert str((tmp_path / "FashionMNIST" / "raw").resolve()) in message
    assert "train-images-idx3-ubyte" in message
    with pytest.raises(ConfigError) as error:
        MNISTDataModule(root=str(tmp_path)).setup()
    assert "data.download=true" in str(error.value) and "apt-get" not in str(error.value)
    assert str((tmp_path / "MNIST" / "raw").resolve()) in str(error.value)


# --- CIFAR -----------------------------------------------------------------------------------------------
def test_cifar_test_files_have_the_official_pickle_keys(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"batch_label", b"data", b"labels"} and entry[b"data"].shape == (8, 3072)


def test_cifar10_batches_and_augmentation(tmp_path):
    written = write_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=16)
    assert dm.num_classes == 10 and dm.image_size == (32, 32) and dm.val_fraction == 0
    check_batches(dm, (3, 32, 32), 10)
    assert len(dm.train_set) == 40 and dm.val_set is dm.test_set and len(dm.test_set) == 10
    assert dm.train_set.base.targets[8:16] == written["data_batch_2"][1]
    # Test images are the stored pixels, normalised.
    raw = torch.from_numpy(written["test_batch"][0][3].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    torch.testing.assert_close(dm.test_set[3][0], (raw - mean) / std)
    # Training images are randomly cropped/flipped: differ from the test view, and from draw to draw.
    torch.manual_seed(0)
    test_view = dm.test_transform()(dm.train_set.base[0][0])
    draws = [dm.train_set[0][0] for _ in range(8)]
    assert sum(not torch.equal(d, test_view) for d in draws) >= 6
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    # Each sample names its view, which reproduces its pixels: crop/flip of the unnormalised image, then Normalize.
    assert dm.train_views.count == 162
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    for _ in range(8):
        image, _, index, view = dm.train_set[5]
        raw = torch.from_numpy(np.array(dm.train_set.raw(index)[0])).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(image, (dm.train_views.crop_flip(raw[None], torch.tensor([view]))[0] - mean) / std)


def test_cifar100_fine_labels_and_val_split(tmp_path):
    written = write_cifar(tmp_path, hundred=True)
    dm = CIFAR100DataModule(root=str(tmp_path), batch_size=8, val_fraction=0.25, seed=1)
    assert dm.num_classes == 100
    check_batches(dm, (3, 32, 32), 100)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 10)
    assert dm.train_set.base.targets == written["train"][1]
    assert set(dm.train_set.indices).isdisjoint(dm.val_set.indices)
    assert dm.train_set.base.classes[:2] == ["c0", "c1"]
    # Held-out samples are evaluated like test samples: no augmentation.
    i = dm.val_set.indices[0]
    assert torch.equal(dm.val_set[0][0], dm.test_transform()(dm.train_set.base[i][0]))


def test_missing_cifar_files_name_the_fix(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ConfigError) as error:
        CIFAR10DataModule(root=str(tmp_path)).setup()
    message = str(error.value)
    assert "data_batch_3" in message and "data.download=true" in message
    assert str((tmp_path / "cifar-10-batches-py").resolve()) in message
    with pytest.raises(ConfigError, match="cifar-100-python"):
        CIFAR100DataModule(root=str(tmp_path)).prepare_data()


# --- train_targets ---------------------------------------------------------------------------------------
def check_train_targets(dm: KDDataModule) -> None:
    """Asked before setup, as the pipeline does; must label every training batch through its indices."""
    labels = dm.train_targets
    assert labels.dtype == torch.long and labels.shape == (dm.train_size,)
    dm.setup("fit")
    batches = 0
    for _, targets, indices, _ in dm.train_dataloader():
        assert torch.equal(labels[indices], targets)
        batches += 1
    assert batches > 1


def test_train_targets_follow_the_batch_indices(tmp_path):
    check_train_targets(DigitsDataModule(batch_size=256, val_fraction=0.1, seed=3))  # a held-out subset
    check_train_targets(SyntheticDataModule(num_classes=5, image_size=8, train_size=40, batch_size=16))
    write_cifar(tmp_path / "c100", hundred=True)
    check_train_targets(CIFAR100DataModule(root=str(tmp_path / "c100"), batch_size=8, val_fraction=0.25, seed=1))
    write_cifar(tmp_path / "c10")
    check_train_targets(CIFAR10DataModule(root=str(tmp_path / "c10"), batch_size=16))
    write_image_folder(tmp_path / "in" / "train", ["a", "b", "c"], per_class=3, size=(8, 8))
    write_image_folder(tmp_path / "in" / "val", ["a", "b", "c"], per_class=1, size=(8, 8))
    check_train_targets(ImageNetDataModule(root=str(tmp_path / "in"), batch_size=4, num_classes=3, image_size=8,
                                           resize_size=8))


def test_train_targets_of_a_dataset_without_a_label_list():
    class Plain(torch.utils.data.Dataset):  # no `targets` attribute: read sample by sample
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int):
            return torch.zeros(1, 2, 2), (7 * i) % 3

    class PlainModule(KDDataModule):
        num_classes, in_channels, image_size = 3, 1, (2, 2)

        def load_train_pool(self):
            return Plain()

        def load_test(self):
            return Plain()

    dm = PlainModule(batch_size=3, val_fraction=0.3, seed=0)
    check_train_targets(dm)
    assert dm.train_targets.tolist() == [(7 * i) % 3 for i in dm.train_set.indices]


# --- train_subset ----------------------------------------------------------------------------------------
def test_train_subset_is_a_seeded_part_of_the_training_split():
    full = DigitsDataModule(batch_size=64, val_fraction=0.1, seed=0)
    full.setup()
    dm = DigitsDataModule(batch_size=64, val_fraction=0.1, seed=0, train_subset=200)
    assert dm.train_size == 200  # before setup, as CRD's memory bank is sized
    check_batches(dm, (1, 8, 8), 10)  # indices are a permutation of [0, 200)
    subset = set(dm.train_set.indices)
    assert len(subset) == 200 and subset <= set(full.train_set.indices)
    assert not subset & set(dm.val_set.indices) and dm.val_set.indices == full.val_set.indices
    assert torch.equal(dm.train_targets, dm.train_set.base.targets[dm.train_set.indices])
    check_train_targets(DigitsDataModule(batch_size=64, val_fraction=0.1, seed=0, train_subset=200))

    again, smaller = (DigitsDataModule(val_fraction=0.1, seed=0, train_subset=k) for k in (200, 50))
    other_seed = DigitsDataModule(val_fraction=0.1, seed=1, train_subset=200)
    for module in (again, smaller, other_seed):
        module.setup()
    assert again.train_set.indices == dm.train_set.indices
    assert set(smaller.train_set.indices) < subset  # nested: one permutation, a shorter prefix
    assert other_seed.train_set.indices != dm.train_set.indices


def test_train_subset_without_a_val_split_and_its_errors(tmp_path):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", n_train=30)
    dm = MNISTDataModule(root=str(tmp_path), batch_size=4, train_subset=12)
    assert dm.train_size == 12  # from the IDX header, before any image is read
    check_batches(dm, (1, 28, 28), 10)
    labels = torch.as_tensor(arrays["train-labels-idx1-ubyte"], dtype=torch.long)
    assert torch.equal(dm.train_targets, labels[dm.train_set.indices])
    assert len(dm.test_set) == 12 and dm.val_set is dm.test_set  # evaluation splits are untouched
    for bad in (0, -3, 2.5):
        with pytest.raises(ConfigError, match="train_subset"):
            MNISTDataModule(root=str(tmp_path), train_subset=bad)
    too_many = MNISTDataModule(root=str(tmp_path), val_fraction=0.2, train_subset=25)  # 24 left after the split
    with pytest.raises(ConfigError, match="exceeds the 24 training samples"):
        _ = too_many.train_size
    with pytest.raises(ConfigError, match="exceeds the 24 training samples"):
        too_many.setup()


# --- ImageNet-style folders ------------------------------------------------------------------------------
def test_imagenet_folders(tmp_path):
    write_image_folder(tmp_path / "train", ["a", "b", "c"], per_class=4)
    write_image_folder(tmp_path / "val", ["a", "b", "c"], per_class=2)
    dm = ImageNetDataModule(root=str(tmp_path), batch_size=5, num_classes=3, image_size=32, resize_size=36)
    check_batches(dm, (3, 32, 32), 3)
    assert (len(dm.train_set), len(dm.test_set)) == (12, 6) and dm.val_set is dm.test_set
    split = ImageNetDataModule(root=str(tmp_path), num_classes=3, image_size=32, resize_size=36, val_fraction=0.25)
    assert split.train_size == 9


def test_imagenet_errors(tmp_path):
    with pytest.raises(ConfigError, match="train/ and val/"):
        ImageNetDataModule(root=str(tmp_path), num_classes=3).setup()
    write_image_folder(tmp_path / "train", ["a", "b", "c"], per_class=1, size=(8, 8))
    write_image_folder(tmp_path / "val", ["a", "b", "d"], per_class=1, size=(8, 8))
    with pytest.raises(ConfigError, match=r"3 class folders but data.num_classes=1000.*data.num_classes=3"):
        ImageNetDataModule(root=str(tmp_path)).setup()
    with pytest.raises(ConfigError, match="class folders of .* differ"):
        ImageNetDataModule(root=str(tmp_path), num_classes=3).setup()


# --- with a Trainer --------------------------------------------------------------------------------------
def test_runs_under_a_trainer():
    import lightning as L

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(64, 10)
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, _):
            images, targets, indices, _ = batch
            self.seen.append(indices)
            return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), targets)

        def validation_step(self, batch, _):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DigitsDataModule(batch_size=512)
    probe = Probe()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(probe, datamodule=dm)
    assert sorted(torch.cat(probe.seen).tolist()) == list(range(dm.train_size))
