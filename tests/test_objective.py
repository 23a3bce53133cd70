"""The search objective: a validation metric on data held out of the training set, never the test split."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kd_lightning.data import (
    CIFAR100DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageNetDataModule,
    MNISTDataModule,
    SyntheticDataModule,
)
from kd_lightning.errors import ConfigError
from kd_lightning.models import build_model
from kd_lightning.sweeps.objective import BASIC_SWEEPER, check_search_objective
from kd_lightning.pipeline import construct, run
from kd_lightning.teachers import load_weights, read_weights
from kd_lightning.train import CONF_DIR
from test_data import write_cifar, write_image_folder, write_mnist

ROOT = Path(__file__).resolve().parents[1]
OPTUNA = "hydra_plugins.kd_optuna_sweeper.kd_optuna_sweeper.KDOptunaSweeper"


def objective_cfg(metric: str):
    return OmegaConf.create({"optimized_metric": metric})


# --- the held-out split of every data module -------------------------------------------------------------
def file_backed_modules(root):
    write_mnist(root / "MNIST" / "raw", n_train=40)
    write_mnist(root / "FashionMNIST" / "raw", n_train=40)
    write_cifar(root, hundred=True)
    write_image_folder(root / "imagenet" / "train", ["a", "b"], per_class=10, size=(8, 8))
    write_image_folder(root / "imagenet" / "val", ["a", "b"], per_class=2, size=(8, 8))
    return {
        "digits": lambda **kw: DigitsDataModule(**kw),
        "mnist": lambda **kw: MNISTDataModule(root=str(root), **kw),
        "fashion_mnist": lambda **kw: FashionMNISTDataModule(root=str(root), system_dir=str(root / "none"), **kw),
        "cifar100": lambda **kw: CIFAR100DataModule(root=str(root), **kw),
        "imagenet": lambda **kw: ImageNetDataModule(root=str(root / "imagenet"), num_classes=2, image_size=8,
                                                    resize_size=8, **kw),
    }


def test_every_file_backed_module_holds_out_the_same_seeded_part_of_its_training_data(tmp_path):
    for name, make in file_backed_modules(tmp_path).items():
        whole = make(val_fraction=0.0)
        whole.setup()
        assert whole.validates_on_test and whole.val_set is whole.test_set, name
        torch.manual_seed(1)  # the run's global seed must not move the split: one split for a whole sweep
        split = make(val_fraction=0.25, seed=7)
        assert not split.validates_on_test, name  # known before any file is read
        predicted = split.train_size
        split.setup()
        train, val = set(split.train_set.indices), set(split.val_set.indices)
        assert predicted == len(train) < whole.train_size, name
        assert not train & val and len(train | val) == whole.train_size, name
        assert split.val_set.base is split.train_set.base and split.val_set is not split.test_set, name
        torch.manual_seed(2)
        again = make(val_fraction=0.25, seed=7)
        again.setup()
        assert again.val_set.indices == split.val_set.indices, name
        other = make(val_fraction=0.25, seed=8)
        other.setup()
        assert other.val_set.indices != split.val_set.indices, name


def test_synthetic_data_validates_on_its_own_split_not_the_test_split():
    dm = SyntheticDataModule(train_size=8, val_size=4, test_size=4, batch_size=4)
    assert not dm.validates_on_test
    dm.setup()
    assert dm.val_set is not dm.test_set


def test_every_data_config_exposes_the_split_options():
    # Without the keys in the YAML, `data.val_fraction=0.1` is refused by Hydra ("use +data.val_fraction").
    for data in ("cifar10", "cifar100", "mnist", "fashion_mnist", "imagenet", "digits"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=[f"data={data}", "data.val_fraction=0.1", "data.seed=3"])
        assert (cfg.data.val_fraction, cfg.data.seed) == (0.1, 3), data


# --- the objective returned to sweepers ------------------------------------------------------------------
def test_default_objective_is_the_validation_accuracy_of_the_trained_student(make_cfg, tmp_path):
    cfg = make_cfg("baseline=false", "trainer.limit_val_batches=null")
    assert cfg.optimized_metric == "val/acc"
    results = run(cfg)
    returned = results["student_metrics"][cfg.optimized_metric]
    # It is the final student's accuracy on the held-out digits, recomputed here from the exported weights.
    state_dict, spec = read_weights(tmp_path / "out" / "student.pt")
    student = load_weights(build_model(**spec), tmp_path / "out" / "student.pt", role="student").eval()
    datamodule = construct(cfg.data)
    datamodule.setup("fit")
    assert not datamodule.validates_on_test
    with torch.no_grad():
        hits = sum((student(images).argmax(1) == targets).sum().item()
                   for images, targets, *_ in datamodule.val_dataloader())
    assert returned == pytest.approx(hits / len(datamodule.val_set), abs=1e-6)


# --- searches refuse the test split ----------------------------------------------------------------------
def test_a_search_refuses_a_test_objective(tmp_path):
    with pytest.raises(ConfigError, match=r"optimized_metric=test/acc.*optimized_metric=val/acc.*val_fraction"):
        check_search_objective(OPTUNA, objective_cfg("test/acc"), DigitsDataModule())
    # Not a search: a plain multirun grid may report test accuracy for every job.
    check_search_objective(BASIC_SWEEPER, objective_cfg("test/acc"), DigitsDataModule())
    check_search_objective(None, objective_cfg("test/acc"), DigitsDataModule())
    check_search_objective(OPTUNA, objective_cfg("val/acc"), DigitsDataModule(val_fraction=0.1))
    check_search_objective(OPTUNA, objective_cfg("val/acc"), SyntheticDataModule())


def test_a_search_refuses_a_validation_set_that_is_the_test_split(tmp_path):
    write_cifar(tmp_path, hundred=True)
    for datamodule in (DigitsDataModule(val_fraction=0), CIFAR100DataModule(root=str(tmp_path))):
        with pytest.raises(ConfigError, match=r"validates on the test split.*data\.val_fraction=0\.1"):
            check_search_objective(OPTUNA, objective_cfg("val/acc"), datamodule)
    check_search_objective(OPTUNA, objective_cfg("val/acc"), CIFAR100DataModule(root=str(tmp_path), val_fraction=0.1))


def test_kd_train_search_with_a_test_objective_fails_before_training(tmp_path):
    # A stand-in for Optuna (not installed): any sweeper but Hydra's basic one makes the jobs a search.
    plugin = tmp_path / "plugins" / "hydra_plugins" / "stand_in_sweeper"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("from hydra._internal.core_plugins.basic_sweeper import BasicSweeper\n\n\n"
                                        "class SearchSweeper(BasicSweeper):\n    pass\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), str(ROOT)]),
           "KD_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run([str(Path(sys.executable).with_name("kd-train")), "-m",
                             "hydra.sweeper._target_=hydra_plugins.stand_in_sweeper.SearchSweeper",
                             "optimized_metric=test/acc", "hydra.sweep.dir=sweep"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    # Refused once, before the first job (kd_lightning.sweeps.checks), with the message and no traceback.
    assert result.returncode == 2, result.stderr[-3000:]
    assert "kd-train: error: optimized_metric=test/acc is the objective of a SearchSweeper search" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "sweep" / "0").exists()
    assert not (tmp_path / "cache").exists(), "the search must be refused before any teacher trains"


def test_a_multi_objective_trial_returns_its_objective_and_its_students_size():
    from kd_lightning.sweeps.objective import objective_values

    results = {"student_metrics": {"val/acc": 0.8},
               "stages": {"teacher": {"size": {"student": {"params": 999, "flops": 9999}}},
                          "student": {"size": {"student": {"params": 12, "flops": 340}}}}}
    assert objective_values(OmegaConf.create({"optimized_metric": "val/acc"}), results) == 0.8
    assert objective_values(OmegaConf.create({"optimized_metric": "val/acc", "second_objective": "student/flops"}),
                            results) == [0.8, 340]
    with pytest.raises(ConfigError, match="second_objective=student/size is not an objective"):
        objective_values(OmegaConf.create({"optimized_metric": "val/acc", "second_objective": "student/size"}),
                         results)
