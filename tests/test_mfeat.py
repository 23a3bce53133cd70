"""UCI Multiple Features: named sources, splits, standardisation, missing files, and a run of the whole job.

Every test reads tiny stand-in files (tests/mfeat_files.py), never the real ones.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from kd_lightning.data import DigitsDataModule, MfeatDataModule
from kd_lightning.data.inputs import attach_input
from kd_lightning.data.mfeat import SOURCES, mfeat_file_name
from kd_lightning.errors import ConfigError
from kd_lightning.models import build_model
from kd_lightning.pipeline import run
from kd_lightning.teachers import read_weights
from mfeat_files import CONSTANT_FEATURE, write_tiny_mfeat

WIDTHS = {"pixels": 240, "fourier": 76, "profiles": 216, "karhunen": 64, "zernike": 47, "morphology": 6}


@pytest.fixture
def mfeat_dir(tmp_path):
    root = tmp_path / "data" / "uci_mfeat"  # where conf/data/mfeat.yaml looks under make_cfg's paths.data_dir
    write_tiny_mfeat(root)
    return root


def module(root, **options) -> MfeatDataModule:
    datamodule = MfeatDataModule(root=str(root), **options)
    datamodule.setup("fit")
    return datamodule


def test_sources_shapes_and_batches_are_named_feature_vectors(mfeat_dir):
    datamodule = MfeatDataModule(root=str(mfeat_dir), batch_size=8)
    # Known before any file is read: the widths are the data set's.
    assert {name: shape[0] for name, shape in datamodule.sources.items()} == WIDTHS
    assert datamodule.default_source == "pixels" and datamodule.input_shape == (240,) and datamodule.in_channels == 240
    assert datamodule.input_shape_of("zernike") == (47,)
    with pytest.raises(ConfigError, match=r"no input 'pixel'; its inputs are \['fourier', 'karhunen', 'morphology', "
                                          r"'pixels', 'profiles', 'zernike'\]"):
        datamodule.input_shape_of("pixel")
    example = datamodule.example_input(3)
    assert {name: tuple(batch.shape) for name, batch in example.items()} == {n: (3, w) for n, w in WIDTHS.items()}

    datamodule.setup("fit")
    inputs, targets, indices, views = next(iter(datamodule.train_dataloader()))
    assert {name: tuple(batch.shape) for name, batch in inputs.items()} == {n: (8, w) for n, w in WIDTHS.items()}
    assert all(batch.dtype == torch.float32 for batch in inputs.values())
    assert targets.shape == (8,) and indices.max() < datamodule.train_size
    assert set(views) == set(WIDTHS) and all((view == 0).all() for view in views.values())  # unaugmented

    other = MfeatDataModule(root=str(mfeat_dir), default_source="zernike")
    assert other.input_shape == (47,) and other.in_channels == 47
    with pytest.raises(ConfigError, match="zernike"):
        MfeatDataModule(root=str(mfeat_dir), default_source="zernik")


def test_single_source_modules_keep_their_plain_tensor_input_bit_for_bit():
    digits = DigitsDataModule()
    assert digits.sources == {"image": (1, 8, 8)} and digits.default_source == "image"
    assert digits.input_shape_of("image") == (1, 8, 8)
    with pytest.raises(ConfigError, match="'image'"):
        digits.input_shape_of("pixels")
    torch.manual_seed(3)
    example = digits.example_input(4)
    torch.manual_seed(3)
    assert isinstance(example, torch.Tensor) and torch.equal(example, torch.randn(4, 1, 8, 8))


def test_test_split_is_stratified_seeded_and_disjoint_from_train_and_validation(mfeat_dir):
    datamodule = module(mfeat_dir, val_fraction=0.2, test_fraction=0.5)
    pool, test = datamodule.train_set.base, datamodule.test_set.base
    # 20 rows per class: 10 of each to test, 10 to the pool, 2 of those (of 100 in all: 20 %) to validation.
    assert torch.bincount(test.targets, minlength=10).tolist() == [10] * 10
    assert torch.bincount(pool.targets, minlength=10).tolist() == [10] * 10
    assert len(datamodule.train_set) == 80 and len(datamodule.val_set) == 20 and datamodule.train_size == 80
    assert not set(datamodule.train_set.indices) & set(datamodule.val_set.indices)
    # Test rows are whole samples of the files that never reach the pool: compare raw pixel rows.
    pool_rows = {tuple(row.tolist()) for row in pool.features["pixels"]}
    assert not any(tuple(row.tolist()) in pool_rows for row in test.features["pixels"])

    again = module(mfeat_dir, val_fraction=0.2, test_fraction=0.5)
    assert torch.equal(again.test_set.base.features["pixels"], test.features["pixels"])
    assert again.val_set.indices == datamodule.val_set.indices
    reseeded = module(mfeat_dir, val_fraction=0.2, test_fraction=0.5, split_seed=1)
    assert not torch.equal(reseeded.test_set.base.features["pixels"], test.features["pixels"])
    # The validation seed moves only the hold-out, never the test split.
    revalidated = module(mfeat_dir, val_fraction=0.2, seed=1)
    assert torch.equal(revalidated.test_set.base.features["pixels"], test.features["pixels"])
    assert revalidated.val_set.indices != datamodule.val_set.indices

    quarter = module(mfeat_dir, val_fraction=0.0, test_fraction=0.25)
    assert torch.bincount(quarter.test_set.base.targets, minlength=10).tolist() == [5] * 10  # round(20 · 0.25)
    with pytest.raises(ConfigError, match="test_fraction"):
        MfeatDataModule(root=str(mfeat_dir), test_fraction=1.0)


def stack(dataset, source):
    return torch.stack([dataset[i][0][source] for i in range(len(dataset))])


def test_standardisation_uses_the_samples_trained_on_only(mfeat_dir):
    datamodule = module(mfeat_dir, val_fraction=0.2)
    train, val, test = datamodule.train_set, datamodule.val_set, datamodule.test_set
    for source in ("pixels", "morphology"):
        trained = stack(train, source).double()
        raw_train = train.base.features[source][torch.as_tensor(train.indices)].double()
        mean, std = raw_train.mean(0), raw_train.std(0, unbiased=False)
        std[raw_train.amax(0) == raw_train.amin(0)] = 1.0
        # Every split is (raw - mean) / std with the training rows' statistics: computed here in float64.
        for split in (train, val, test):
            raw = split.base.features[source][torch.as_tensor(split.indices) if split.indices else slice(None)]
            assert torch.allclose(stack(split, source).double(), (raw.double() - mean) / std, atol=1e-5)
        live = torch.ones(WIDTHS[source], dtype=torch.bool)
        if source == CONSTANT_FEATURE[0]:
            live[CONSTANT_FEATURE[1]] = False
            assert (trained[:, CONSTANT_FEATURE[1]] == 0).all()
        assert torch.allclose(trained.mean(0), torch.zeros(WIDTHS[source], dtype=torch.float64), atol=1e-5)
        assert torch.allclose(trained[:, live].std(0, unbiased=False), torch.ones(int(live.sum()),
                                                                                   dtype=torch.float64), atol=1e-4)
    # Had the validation rows entered the statistics, the training rows alone would not be centred at 0.
    assert stack(val, "pixels").double().mean(0).abs().max() > 1e-2


def test_missing_files_name_the_setup_command(tmp_path, mfeat_dir):
    empty = MfeatDataModule(root=str(tmp_path / "nowhere"))
    assert empty.in_channels == 240  # shapes need no files
    with pytest.raises(ConfigError, match=r"bash scripts/setup.sh") as error:
        empty.train_size
    assert "mfeat-pix.csv" in str(error.value) and "paths.data_dir" in str(error.value)
    (mfeat_dir / mfeat_file_name("zernike")).unlink()
    with pytest.raises(ConfigError, match=r"mfeat-zer.csv missing"):
        module(mfeat_dir)


def test_a_file_of_another_layout_is_refused_with_the_fix(mfeat_dir):
    path = mfeat_dir / mfeat_file_name("fourier")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(",".join(line.split(",")[1:]) for line in lines) + "\n")  # one feature short
    with pytest.raises(ConfigError, match=r"76 features and a class label"):
        module(mfeat_dir)


def test_a_network_reads_its_source_out_of_a_named_batch(mfeat_dir):
    datamodule = MfeatDataModule(root=str(mfeat_dir))
    model = attach_input(build_model("mlp_small", 10, 47), "zernike").eval()
    example = datamodule.example_input(2)
    with torch.no_grad():
        assert torch.equal(model(example), model(example["zernike"]))
    assert list(model.state_dict()) == list(build_model("mlp_small", 10, 47).state_dict())
    model.kd_input = "fourier_typo"
    with pytest.raises(ConfigError, match="'fourier_typo'"):
        model(example)


def test_the_job_trains_mlps_on_the_default_source_and_reports(make_cfg, mfeat_dir, tmp_path, capsys):
    results = run(make_cfg("data=mfeat", "teacher=mlp_large", "student=mlp_small", "+student.hidden=[16,8]",
                           "data.batch_size=16",
                           "trainer.max_epochs=10", "trainer.limit_train_batches=null",
                           "trainer.limit_val_batches=null", "trainer.limit_test_batches=null"))
    table = capsys.readouterr().out
    for role in ("teacher", "student baseline", "student + kd"):
        assert role in table
    assert "mlp_large" in table and "mlp_small" in table
    # Chance is 10 %; the tiny files' classes are well separated, so ten epochs of 100 samples lift every
    # network well above it.
    for metrics in (results["teacher"]["metrics"], results["baseline"], results["student_metrics"]):
        assert metrics["test/acc"] > 0.5, metrics
    # Sizes measured on the default source: 240 pixels → 16 → 8 → 10 classes.
    assert results["stages"]["student"]["size"]["student"]["params"] == 240 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["student_metrics"]["test/acc"] == results["student_metrics"]["test/acc"]
    # The exported student (read with weights_only=True) rebuilds from its spec: the widths are a plain list.
    state_dict, spec = read_weights(tmp_path / "out" / "student.pt")
    assert spec == {"name": "mlp_small", "num_classes": 10, "in_channels": 240, "hidden": [16, 8], "input": "pixels"}
    rebuilt = build_model(**spec)
    rebuilt.load_state_dict(state_dict)
    assert rebuilt.kd_input == "pixels"  # and reads its input out of a batch of named inputs, as in training


def test_a_pixels_teacher_distils_a_zernike_student_with_the_teacher_cache(make_cfg, mfeat_dir, recorded_losses):
    # Cross-modal: teacher and student read different sources of each sample; the cache keys on the teacher's.
    common = ("data=mfeat", "teacher=mlp_large", "student=mlp_small", "inputs.teacher=pixels",
              "inputs.student=zernike", "data.batch_size=16", "trainer.max_epochs=2")
    plain = run(make_cfg(*common))
    losses = list(recorded_losses["student"])
    recorded_losses.clear()
    cached = run(make_cfg(*common, "teacher_cache=memory"))
    assert recorded_losses["student"] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert plain["stages"]["student"]["size"]["student"]["params"] == 47 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10
    assert plain["teacher"]["model"]["input"] == "pixels" and plain["student"]["input"] == "zernike"
    assert cached["student_metrics"] == pytest.approx(plain["student_metrics"], abs=0.02)
