"""Every registered model and every registered distillation term trains real batches end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch

from kd_lightning.data import MfeatDataModule, SyntheticDataModule
from kd_lightning.data.inputs import attach_input
from kd_lightning.models import MODELS, build_model
from kd_lightning.pipeline import build_terms
from kd_lightning.schemes import Offline, Supervised
from kd_lightning.teachers import FrozenTeacher
from scheme_cases import TRANSFORMER_TERMS, VIT_DIGITS, VIT_DIGITS_LARGE
from mfeat_files import write_tiny_mfeat

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL_INPUT_MODELS = {"convnet_tiny", "convnet_small", "convnet_large"}


def sgd(parameters):
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9)


def fit_steps(module: L.LightningModule, datamodule, steps: int = 2) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[name], value) for name, value in module.state_dict().items()
               if value.is_floating_point())


@pytest.mark.parametrize("name", list(MODELS) + ["torchvision:resnet18"])
def test_every_model_trains(name, tmp_path):
    small = name in SMALL_INPUT_MODELS
    if name in MODELS and MODELS.meta(name).get("inputs") == "vectors":  # feature-vector models: mfeat's
        write_tiny_mfeat(tmp_path / "mfeat", rows_per_class=2)
        datamodule = MfeatDataModule(root=str(tmp_path / "mfeat"), batch_size=8, test_fraction=0.5)
    else:
        datamodule = SyntheticDataModule(num_classes=10, in_channels=1 if small else 3,
                                         image_size=8 if small else 32, train_size=16, val_size=8, test_size=8,
                                         batch_size=8)
    model = build_model(name, num_classes=10, in_channels=datamodule.in_channels)
    if datamodule.named_inputs:
        attach_input(model, datamodule.default_source)
    before = snapshot(model)
    trainer = fit_steps(Supervised(model, num_classes=10, optimizer=sgd), datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert changed(before, model)


def distill_options() -> list[str]:
    return sorted(path.stem for path in (CONF / "distill").glob("*.yaml"))


@pytest.mark.parametrize("term_name", distill_options())
def test_every_term_trains_with_the_offline_scheme(make_cfg, term_name):
    torch.manual_seed(0)
    transformer = term_name in TRANSFORMER_TERMS
    datamodule = SyntheticDataModule(num_classes=10, in_channels=1 if transformer else 3,
                                     image_size=8 if transformer else 32, train_size=32, val_size=8, test_size=8,
                                     batch_size=8)
    channels = datamodule.in_channels
    teacher = build_model(**(VIT_DIGITS_LARGE if transformer else {"name": "resnet20"}), num_classes=10,
                          in_channels=channels)
    teacher_before = snapshot(teacher)
    student = build_model(**(VIT_DIGITS if transformer else {"name": "resnet8"}), num_classes=10, in_channels=channels)
    student_before = snapshot(student)
    terms = build_terms(make_cfg(f"distill=[{term_name}]"))
    module = Offline(student=student, teacher=FrozenTeacher(teacher), terms=terms, num_classes=10,
                     example_input=datamodule.example_input(), optimizer=sgd,
                     train_size=datamodule.train_size, train_targets=datamodule.train_targets)
    term_before = copy.deepcopy(snapshot(module.terms))
    if any(term.init_epochs for term in module.terms.values()):  # as the pipeline runs it: init, then main
        module.set_init_stage(True)
        assert torch.isfinite(fit_steps(module, datamodule, steps=2).callback_metrics["train/loss"])
        module.set_init_stage(False)
    trainer = fit_steps(module, datamodule, steps=3)
    logged = trainer.callback_metrics
    assert torch.isfinite(logged["train/loss"])
    assert all(any(key.startswith(f"train/{name}") for key in logged) for name in terms), sorted(logged)
    assert changed(student_before, student)
    assert not changed(teacher_before, teacher), "the teacher must stay frozen (weights and BN statistics)"
    if any(True for _ in module.terms.parameters()):
        assert changed(term_before, module.terms), "learnable adapters must train (in the init or main stage)"
