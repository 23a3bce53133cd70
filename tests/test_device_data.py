"""The device-resident training pipeline (kd_lightning/data/device.py) gives the DataLoader path's batches:
torchvision's pixels for every view, its order, its shards and class pairs, uniform views, exact resume."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torchvision import transforms

from kd_lightning.data import CIFAR10DataModule, DigitsDataModule
from kd_lightning.data.device import DeviceBatches, ResidentSplit, fits_on
from kd_lightning.data.pairs import ClassPairBatchSampler, EpochPermutation
from kd_lightning.data.resumable import EpochPermutationSampler, ResumableLoader
from kd_lightning.errors import ConfigError
from test_data import write_cifar
from test_resume import RESUME_STEP, compose_cfg, run_recording
from test_sync import SyncCounter


@pytest.fixture
def cifar(tmp_path) -> CIFAR10DataModule:
    write_cifar(tmp_path, per_batch=8)  # 40 training images of random pixels
    datamodule = CIFAR10DataModule(root=str(tmp_path), batch_size=8, device_resident=True)
    datamodule.setup()
    return datamodule


def torchvision_augmentation(datamodule, dy: int, dx: int, flipped: bool):
    """The module's augmentation as torchvision spells it (CIFAR: RandomCrop(32, 4) + flip + ToTensor +
    Normalize; digits: RandomCrop(8, padding=1, fill=blank)), with its random draws fixed to one view."""
    views = datamodule.train_views
    size = datamodule.image_size
    crop = transforms.RandomCrop(size, padding=views.pad, fill=views.fill)
    crop.get_params = lambda image, output_size: (dy, dx, *output_size)
    steps = [crop]
    if views.flip:
        steps.append(transforms.RandomHorizontalFlip(1.0 if flipped else 0.0))
    if isinstance(datamodule, CIFAR10DataModule):
        steps += [transforms.ToTensor(), transforms.Normalize(datamodule.mean, datamodule.std)]
    return transforms.Compose(steps)


def assert_views_match_torchvision(datamodule, indices, views) -> None:
    split = datamodule.resident_train_split()
    for index, view in zip(indices, views):
        dy, dx, flipped = (int(part) for part in split.views.decode(torch.tensor(view)))
        image = datamodule.train_set.raw(index)[0]  # CIFAR: a PIL image; digits: its normalised tensor
        expected = torchvision_augmentation(datamodule, dy, dx, bool(flipped))(image)
        seen = split.inputs(torch.tensor([index]), torch.tensor([view]))[0]
        assert torch.equal(seen, expected), (index, view, (seen - expected).abs().max())


def test_cifar_views_are_the_pixels_of_the_torchvision_transform(cifar):
    views = cifar.augment_views()
    corners = [views.encode(dy, dx, flipped) for dy in (0, 4, 8) for dx in (0, 3, 8) for flipped in (0, 1)]
    assert_views_match_torchvision(cifar, [i % 40 for i in range(len(corners))], corners)
    # And the views the loader draws are the ones it applies.
    images, _, indices, drawn = next(iter(cifar.train_dataloader()))
    assert_views_match_torchvision(cifar, indices.tolist(), drawn.tolist())
    split = cifar.resident_train_split()
    assert torch.equal(images, split.inputs(indices, drawn))


def test_digits_shifts_pad_with_the_normalised_blank_like_the_torchvision_crop():
    datamodule = DigitsDataModule(augment=True, device_resident=True)
    datamodule.setup()
    views = datamodule.augment_views()
    every_view = list(range(views.count))
    assert_views_match_torchvision(datamodule, list(range(len(every_view))), every_view)


def test_drawn_views_have_torchvisions_distribution(cifar):
    loader = cifar.train_dataloader()
    drawn = []
    for epoch in range(250):
        loader.sampler.set_epoch(epoch)
        drawn += [view for batch in loader for view in batch[3].tolist()]
    views = cifar.augment_views()
    dy, dx, flipped = views.decode(torch.tensor(drawn))
    n = len(drawn)  # 10,000 draws: uniform over 162 views, i.e. offsets uniform on [0, 8] and a fair flip
    assert set(Counter(drawn)) == set(range(views.count))
    assert all(abs(count - n / 9) < 0.15 * n / 9 for count in Counter(dy.tolist()).values())
    assert all(abs(count - n / 9) < 0.15 * n / 9 for count in Counter(dx.tolist()).values())
    assert abs(flipped.float().mean().item() - 0.5) < 0.03
    assert max(Counter(drawn).values()) < 2.0 * n / views.count


def test_unaugmented_batches_equal_the_dataloader_paths_bit_for_bit():
    resident = DigitsDataModule(batch_size=64, device_resident=True)
    loaded = DigitsDataModule(batch_size=64, device_resident=False)
    resident.setup(), loaded.setup()
    device_loader, data_loader = resident.train_dataloader(), loaded.train_dataloader()
    assert isinstance(device_loader, DeviceBatches) and isinstance(data_loader, ResumableLoader)
    assert len(device_loader) == len(data_loader)
    for epoch in (0, 1):
        device_loader.sampler.set_epoch(epoch), data_loader.sampler.set_epoch(epoch)
        pairs = list(zip(device_loader, data_loader, strict=True))
        for (images, targets, indices, views), (ref_images, ref_targets, ref_indices, ref_views) in pairs:
            assert torch.equal(images, ref_images) and torch.equal(targets, ref_targets)
            assert torch.equal(indices, ref_indices) and torch.equal(views, ref_views) and not views.any()


def test_a_resumed_epoch_replays_the_order_and_the_views(cifar):
    uninterrupted = cifar.train_dataloader()
    uninterrupted.sampler.set_epoch(3)
    epoch = list(uninterrupted)
    interrupted = cifar.train_dataloader()
    interrupted.sampler.set_epoch(3)
    for _, _batch in zip(range(2), interrupted):
        pass
    resumed = cifar.train_dataloader()
    resumed.load_state_dict(interrupted.state_dict())
    resumed.sampler.set_epoch(3)
    rest = list(resumed)
    assert len(rest) == len(epoch) - 2
    for got, want in zip(rest, epoch[2:], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_ddp_ranks_draw_disjoint_shards_and_their_own_views(cifar):
    split = cifar.resident_train_split()
    shards = []
    for rank in (0, 1):
        sampler = EpochPermutationSampler(cifar.train_set, num_replicas=2, rank=rank, seed=0)
        shards.append([batch for batch in DeviceBatches(split, 4, sampler=sampler, rank=rank)])
    indices = [torch.cat([batch[2] for batch in shard]).tolist() for shard in shards]
    assert sorted(indices[0] + indices[1]) == list(range(40))
    views = [torch.cat([batch[3] for batch in shard]) for shard in shards]
    assert not torch.equal(views[0], views[1])


def test_class_pair_batches_are_the_dataloader_paths(cifar):
    targets = cifar.train_targets
    def pair_sampler():
        return ClassPairBatchSampler(EpochPermutation(40, cifar.seed), 8, False, targets, cifar.seed)
    device_batches = cifar.device_batches(cifar.resident_train_split(), pairs=True)
    loaded = ResumableLoader(cifar.train_set, batch_sampler=pair_sampler())
    for epoch in (0, 1):
        device_batches.batch_sampler.set_epoch(epoch), loaded.batch_sampler.set_epoch(epoch)
        for (_, pair_targets, indices, _), reference in zip(device_batches, loaded, strict=True):
            assert torch.equal(indices, reference[2])
            assert torch.equal(pair_targets[:4], pair_targets[4:])


def test_auto_keeps_cpu_runs_on_the_dataloader_and_true_refuses_what_cannot_be_resident():
    auto = DigitsDataModule(augment=True)
    auto.setup()
    assert auto.device_resident == "auto" and isinstance(auto.train_dataloader(), ResumableLoader)
    assert not fits_on(torch.device("cpu"), 1)

    class Blurred(DigitsDataModule):
        def train_transform(self):
            return transforms.GaussianBlur(3)  # not a crop/flip view

    blurred = Blurred(device_resident=True)
    blurred.setup()
    with pytest.raises(ConfigError, match="device_resident=false"):
        blurred.train_dataloader()
    with pytest.raises(ConfigError, match="auto, true or false"):
        DigitsDataModule(device_resident="yes")


@pytest.mark.parametrize(("scheme", "stages"), [("offline", 3), ("cs_kd", 3)])  # cs_kd: class-pair batches
def test_a_job_trains_the_same_on_the_device_path(make_cfg, recorded_losses, scheme, stages):
    from kd_lightning.pipeline import run

    run(make_cfg(f"scheme={scheme}", "data.device_resident=false"))
    loaded = dict(recorded_losses)
    recorded_losses.clear()
    run(make_cfg(f"scheme={scheme}", "data.device_resident=true", "paths.cache_dir=${paths.output_dir}/other_cache"))
    assert recorded_losses == loaded and len(loaded) == stages


def test_mid_epoch_resume_of_augmented_device_batches_is_exact(tmp_path, monkeypatch):
    options = ["scheme=offline", "distill=[kd]", "data=digits", "data.augment=true", "data.device_resident=true"]
    whole = run_recording(compose_cfg(tmp_path / "cache", tmp_path / "whole", *options), monkeypatch)
    (checkpoint,) = (tmp_path / "whole" / "student").rglob(f"epoch=0-step={RESUME_STEP}.ckpt")
    resumed = run_recording(compose_cfg(tmp_path / "cache", tmp_path / "resumed", *options,
                                        f"ckpt_path='{checkpoint}'"), monkeypatch)
    assert resumed == {step: loss for step, loss in whole.items() if step > RESUME_STEP}


def test_augmented_device_batches_do_not_wait_for_the_device(make_cfg, monkeypatch):
    from kd_lightning import pipeline

    cfg = make_cfg("data.augment=true", "data.device_resident=true", "baseline=false", "logger=csv",
                   "callbacks=default", "trainer.limit_train_batches=6", "trainer.log_every_n_steps=50",
                   "trainer.limit_val_batches=1", fast=False)
    counter = SyncCounter(monkeypatch)
    monkeypatch.setattr("kd_lightning.trainer_setup.build_callbacks", lambda *args: [counter])
    datamodule = pipeline.construct(cfg.data)
    student_stage = pipeline.plan_stages(cfg)[-1]
    module = pipeline.build_stage_module(pipeline.stage_config(cfg, student_stage), student_stage, datamodule,
                                         {"teacher": pipeline.build_model(cfg.teacher.model, datamodule)})
    pipeline.fit_and_test(cfg, module, datamodule, "student", max_epochs=1, test=False)
    assert sorted(counter.calls) == list(range(6))
    assert not any(counter.calls[batch] for batch in range(5)), counter.calls


def test_resident_split_inputs_convert_uint8_like_to_tensor():
    images = torch.randint(0, 256, (3, 2, 4, 4), dtype=torch.uint8)
    mean, std = torch.tensor([0.2, 0.7]).view(1, 2, 1, 1), torch.tensor([0.3, 0.1]).view(1, 2, 1, 1)
    split = ResidentSplit(images, torch.arange(3), mean, std)
    reference = transforms.Normalize([0.2, 0.7], [0.3, 0.1])(images[2].float() / 255)
    assert torch.allclose(split.inputs(torch.tensor([2]), None)[0], reference, rtol=0, atol=1e-6)


def test_drawing_augmented_device_batches_never_reads_the_device(cifar, monkeypatch):
    # The Trainer fetches batches outside the window SyncCounter watches, so the loader is watched here.
    counter = SyncCounter(monkeypatch)
    loader = cifar.train_dataloader()
    counter.calls[0], counter._batch = [], 0
    batches = list(loader)
    counter._batch = None
    # The samplers shuffle host tensors (which the counter cannot tell from device ones on a CPU machine).
    device_reads = [call for call in counter.calls[0] if "/data/resumable.py" not in call]
    assert len(batches) == 5 and not device_reads, device_reads
