"""The exact teacher-output cache: a hit returns what its miss computed, a cached run trains as an uncached one,
a shared file is reused across jobs, and what cannot be cached is refused with the fix."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kd_lightning.data import DigitsDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms import CRD, KD, FitNet
from kd_lightning.models import build_model
from kd_lightning.pipeline import run
from kd_lightning.schemes import Offline
from kd_lightning.teacher_cache import TeacherCacheOptions, TeacherOutputCache, stored_inputs, training_inputs

CPU = torch.device("cpu")


def options(tmp_path: Path, **overrides) -> TeacherCacheOptions:
    return TeacherCacheOptions(**{"storage": "memory", "directory": tmp_path / "outputs", "dtype": "float32",
                                  **overrides})


def digits(**overrides) -> DigitsDataModule:
    return DigitsDataModule(**{"batch_size": 32, "augment": True, "train_subset": 96, **overrides})


def offline(data: DigitsDataModule, cache: TeacherCacheOptions | None, terms=None, teacher_seed: int = 0) -> Offline:
    torch.manual_seed(teacher_seed)
    teacher = build_model("convnet_large", 10, 1)
    return Offline(student=build_model("convnet_tiny", 10, 1), teacher=teacher,
                   terms=terms if terms is not None else {"kd": KD(), "crd": CRD(nce_k=8)}, num_classes=10,
                   example_input=data.example_input(), train_size=data.train_size, train_targets=data.train_targets,
                   ce_weight=1.0, teacher_cache=cache, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def opened(module: Offline, data: DigitsDataModule) -> TeacherOutputCache:
    cache = module.teacher_outputs
    cache.open(data, module.teacher.model, module.teacher_forward, CPU, "32-true")
    return cache


def fresh(module: Offline, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = module.teacher(images)
    return logits, module.teacher_taps.features["penultimate"]


def test_a_hit_returns_the_bits_its_miss_computed(tmp_path):
    data = digits()
    module = offline(data, options(tmp_path))
    cache = opened(module, data)
    assert set(cache.slices) == {"logits", "penultimate"}  # KD's logits and CRD's pooled embedding
    positions = torch.arange(32)
    raw = stored_inputs(data.train_set, positions.tolist())
    views = data.train_views.draw(32, torch.Generator().manual_seed(0))
    images = data.train_views.crop_flip(raw, views)

    cache.lookup(positions, views)  # all misses: the teacher runs on the whole batch, as without the cache
    logits, features = module.teacher_logits_and_features(images)
    expected_logits, expected_penultimate = fresh(module, images)
    assert torch.equal(logits, expected_logits) and torch.equal(features["penultimate"], expected_penultimate)

    cache.lookup(positions, views)  # all hits: no teacher forward, the stored bits
    hit_logits, hit_features = module.teacher_logits_and_features(images)
    assert (cache.hits, cache.misses) == (32, 32)
    assert torch.equal(hit_logits, expected_logits) and torch.equal(hit_features["penultimate"], expected_penultimate)

    # Half the samples in another view: their rows come from a forward of the misses, the rest are hits.
    other = views.clone()
    other[16:] = (views[16:] + 1) % data.train_views.count
    shifted = data.train_views.crop_flip(raw, other)
    cache.lookup(positions, other)
    mixed_logits, mixed_features = module.teacher_logits_and_features(shifted)
    miss_logits, miss_penultimate = fresh(module, shifted[16:])
    assert torch.equal(mixed_logits[:16], expected_logits[:16]) and torch.equal(mixed_logits[16:], miss_logits)
    assert torch.equal(mixed_features["penultimate"][16:], miss_penultimate)
    assert not torch.equal(miss_logits, expected_logits[16:])  # the other view is another input


def count_lookups(monkeypatch, outcome: str) -> list[int]:
    """Record, per training batch, how many of its samples the cache served as `outcome` ("hits" or "misses")."""
    counts: list[int] = []
    original = TeacherOutputCache.lookup

    def counting(self, indices, views):
        original(self, indices, views)
        counts.append(len(getattr(self._pending, outcome)))

    monkeypatch.setattr(TeacherOutputCache, "lookup", counting)
    return counts


def test_a_cached_run_trains_like_an_uncached_one(make_cfg, recorded_losses, monkeypatch):
    served = count_lookups(monkeypatch, "hits")
    common = ("data.augment=true", "+data.train_subset=256", "trainer.max_epochs=4",
              "trainer.limit_train_batches=null", "baseline=false", "teacher.max_epochs=1")
    run(make_cfg(*common))
    plain = recorded_losses.pop("student")
    run(make_cfg(*common, "teacher_cache=memory", "teacher_cache.dtype=float32"))
    cached = recorded_losses.pop("student")
    run(make_cfg(*common, "teacher_cache=memory"))
    rounded = recorded_losses.pop("student")
    steps = 4  # per epoch: 256 samples, batches of 64
    assert served[:steps] == [0] * steps and sum(served[steps:2 * len(plain)]) > 50  # later epochs do hit
    # The first epoch has only misses, so the teacher ran on the same batches: identical losses.
    assert cached[:steps] == plain[:steps]
    # Later hits come from forwards in other batches, which may move the teacher's last bits (module docstring).
    assert cached == pytest.approx(plain, rel=1e-5, abs=1e-6)
    # float16 rounds the stored logits (11 significant bits): close, not equal.
    assert rounded == pytest.approx(plain, rel=2e-3)


def test_a_shared_file_is_precomputed_once_and_reused_by_the_next_job(tmp_path, caplog):
    data = digits()
    first = offline(data, options(tmp_path, storage="mmap", precompute=True))
    with caplog.at_level(logging.INFO, logger="kd_lightning.teacher_cache"):
        cache = opened(first, data)
    assert "teacher cache: 96 × 9 views × 10 logits + 64 penultimate float32 = 0.00 GB, mmap" in caplog.text
    assert bool(cache.filled.all())
    # Precomputed rows are the teacher's outputs for the training inputs of that view (one batch of all 96).
    view = 4
    inputs = training_inputs(data.train_set, stored_inputs(data.train_set, list(range(96))), view)
    logits, penultimate = fresh(first, inputs)
    assert torch.equal(cache.table[:, view, :10], logits) and torch.equal(cache.table[:, view, 10:], penultimate)

    files = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    second = offline(data, options(tmp_path, storage="mmap"))  # another job: same teacher, same data
    reused = opened(second, data)
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == files
    positions, views = torch.arange(8), torch.full((8,), view)
    reused.lookup(positions, views)
    served, _ = second.teacher_logits_and_features(inputs[:8])
    assert (reused.hits, reused.misses) == (8, 0) and torch.equal(served, logits[:8])

    other_teacher = offline(data, options(tmp_path, storage="mmap"), teacher_seed=1)
    opened(other_teacher, data)
    assert len(list((tmp_path / "outputs").glob("*.bin"))) == 2  # keyed by the teacher's weights


def test_what_the_cache_cannot_serve_is_refused_with_the_fix(tmp_path, make_cfg):
    data = digits()
    with pytest.raises(ConfigError, match=r"\['fitnet'\].*teacher_cache=none"):
        offline(data, options(tmp_path),
                terms={"kd": KD(), "fitnet": FitNet(student_tap="stage1", teacher_tap="stage1")})

    class UnnamedViews(DigitsDataModule):
        train_views = None

    unnamed = UnnamedViews(batch_size=32, train_subset=96)
    with pytest.raises(ConfigError, match="no named views.*teacher_cache=none"):
        opened(offline(unnamed, options(tmp_path)), unnamed)
    with pytest.raises(ConfigError, match="over teacher_cache.max_memory_gb.*teacher_cache=mmap"):
        opened(offline(data, options(tmp_path, max_memory_gb=1e-6)), data)
    with pytest.raises(ConfigError, match="teacher_cache.storage='disk'"):
        options(tmp_path, storage="disk")
    with pytest.raises(ConfigError, match="MultiTeacher cannot use the teacher cache"):
        run(make_cfg("scheme=multi_teacher", "teacher_cache=memory"))
    with pytest.raises(ConfigError, match="no stage of this run distils from a trained teacher"):
        run(make_cfg("scheme=dml", "teacher_cache=memory"))


def test_a_float16_miss_returns_the_bits_a_later_hit_of_it_will(tmp_path):
    data = digits()
    module = offline(data, options(tmp_path, dtype="float16"))
    cache = opened(module, data)
    positions = torch.arange(32)
    raw = stored_inputs(data.train_set, positions.tolist())
    views = data.train_views.draw(32, torch.Generator().manual_seed(0))
    other = views.clone()
    other[16:] = (views[16:] + 1) % data.train_views.count
    for served_views in (views, other):  # all misses; then half hits, half misses
        images = data.train_views.crop_flip(raw, served_views)
        cache.lookup(positions, served_views)
        missed_logits, missed_features = module.teacher_logits_and_features(images)
        cache.lookup(positions, served_views)
        hit_logits, hit_features = module.teacher_logits_and_features(images)
        assert torch.equal(missed_logits, hit_logits)
        assert torch.equal(missed_features["penultimate"], hit_features["penultimate"])
        assert missed_logits.dtype == torch.float32  # rounded to float16's values, served in the forward's dtype
    assert not torch.equal(missed_logits, fresh(module, images)[0])  # float16 did round them


def test_a_run_on_an_empty_shared_file_and_one_on_the_file_it_filled_train_alike(make_cfg, recorded_losses,
                                                                                 monkeypatch):
    misses = count_lookups(monkeypatch, "misses")
    common = ("data.augment=true", "+data.train_subset=256", "trainer.max_epochs=3",
              "trainer.limit_train_batches=null", "baseline=false", "teacher.max_epochs=1", "teacher_cache=mmap")
    run(make_cfg(*common))  # the default float16, on an empty file
    on_empty = recorded_losses.pop("student")
    assert sum(misses) > 0
    misses.clear()
    run(make_cfg(*common))  # the same job again: every entry it reads, the first run stored
    on_full = recorded_losses.pop("student")
    assert sum(misses) == 0 and len(misses) == len(on_full)
    assert on_full == on_empty  # bit for bit


def test_a_damaged_shared_file_is_replaced_by_an_empty_one_with_a_one_line_warning(tmp_path, caplog):
    data = digits()
    opened(offline(data, options(tmp_path, storage="mmap", precompute=True)), data)
    [path] = (tmp_path / "outputs").glob("*.bin")
    size = path.stat().st_size
    view = 4
    inputs = training_inputs(data.train_set, stored_inputs(data.train_set, list(range(8))), view)

    def truncate() -> None:
        with open(path, "r+b") as file:
            file.truncate(size // 2)

    def overwrite_header() -> None:
        with open(path, "r+b") as file:
            file.write(b"\xff" * 64)

    for damage in (truncate, overwrite_header):
        damage()
        caplog.clear()
        module = offline(data, options(tmp_path, storage="mmap"))
        with caplog.at_level(logging.WARNING, logger="kd_lightning.teacher_cache"):
            cache = opened(module, data)
        warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
        assert len(warnings) == 1 and str(path) in warnings[0] and "damaged" in warnings[0], warnings
        assert path.stat().st_size == size and not bool(cache.filled.any())
        cache.lookup(torch.arange(8), torch.full((8,), view))
        served, _ = module.teacher_logits_and_features(inputs)
        assert (cache.hits, cache.misses) == (0, 8) and torch.equal(served, fresh(module, inputs)[0])
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind
