"""Bad input gets a ConfigError whose one paragraph names the fix (and never a deep traceback)."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException

from kd_lightning.errors import ConfigError
from kd_lightning.models import build_model
from kd_lightning.pipeline import build_terms, run


def test_unknown_model_lists_valid_names(make_cfg):
    with pytest.raises(ConfigError, match=r"Unknown model 'resnet9'.*resnet8x4.*torchvision:"):
        build_model("resnet9", num_classes=10)


def test_unknown_term_lists_valid_options(make_cfg):
    with pytest.raises(ConfigCompositionException) as error:
        make_cfg("distill=[kdd]")
    assert "kd" in str(error.value.__cause__ or error.value)


def test_unknown_dataset_lists_valid_options(make_cfg):
    with pytest.raises(ConfigCompositionException) as error:
        make_cfg("data=cifar1000")
    assert "cifar100" in str(error.value.__cause__ or error.value)


def test_tap_the_model_lacks_names_the_declared_taps(make_cfg):
    with pytest.raises(ConfigError, match=r"no tap 'stage9'.*stage1"):
        run(make_cfg("baseline=false", "distill=[fitnet]", "distill.fitnet.student_tap=stage9"))


def test_missing_teacher_checkpoint(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*scheme=supervised"):
        run(make_cfg(f"teacher.checkpoint={tmp_path / 'nope.ckpt'}"))


def test_teacher_checkpoint_of_another_architecture(make_cfg, tmp_path):
    path = tmp_path / "resnet8.pt"
    torch.save(build_model("resnet8", num_classes=10, in_channels=1).state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit model 'convnet_large'.*architecture"):
        run(make_cfg(f"teacher.checkpoint={path}"))


def test_teacher_checkpoint_of_another_class_count(make_cfg, tmp_path):
    from kd_lightning.teachers import export_student

    path = export_student(build_model("convnet_large", num_classes=7, in_channels=1), tmp_path / "seven.pt")
    with pytest.raises(ConfigError, match="num_classes=7.*num_classes=10"):
        run(make_cfg(f"teacher.checkpoint={path}"))


def test_teacher_file_that_is_not_weights(make_cfg, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(build_model("convnet_large", num_classes=10, in_channels=1), path)  # a pickled module
    with pytest.raises(ConfigError, match="weights_only=True"):
        run(make_cfg(f"teacher.checkpoint={path}"))


def test_missing_dataset_files(make_cfg):
    with pytest.raises(ConfigError, match="download=true"):
        run(make_cfg("data=cifar100", "student=resnet8", "teacher=resnet56"))


def test_gpu_trainer_without_gpu(make_cfg):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="trainer=cpu"):
        run(make_cfg("trainer=gpu"))


def test_distillation_term_in_a_scheme_without_teacher(make_cfg):
    with pytest.raises(ConfigError, match=r"distill=\[\]"):
        run(make_cfg("scheme=supervised", "distill=[kd]"))


def test_misspelled_term_option_is_reported_with_its_key(make_cfg):
    cfg = make_cfg("+distill.kd.temprature=2")
    with pytest.raises(Exception, match=r"temprature(.|\n)*distill\.kd"):
        build_terms(cfg)


def test_warmup_longer_than_training(make_cfg):
    with pytest.raises(ConfigError, match=r"warmup_epochs=20 is longer than training.*max_epochs=1"):
        run(make_cfg("baseline=false", "distill=[dkd]"))


def test_feature_term_on_taps_no_adapter_can_match(make_cfg):
    # FSP compares C×C' matrices directly, so it needs equal widths; the digits pair differs (4 vs 32).
    with pytest.raises(ConfigError, match="equal channel counts"):
        run(make_cfg("baseline=false", "distill=[fsp]"))


def test_crd_without_sample_indices(make_cfg):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from kd_lightning.pipeline import build_terms
    from kd_lightning.schemes import Offline

    images, targets = torch.randn(8, 1, 8, 8), torch.arange(8) % 2
    module = Offline(student=build_model("convnet_tiny", 2, 1), teacher=build_model("convnet_large", 2, 1),
                     terms=build_terms(make_cfg("distill=[crd]")), num_classes=2, example_input=images[:2],
                     train_size=8, train_targets=targets, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    pairs = DataLoader(TensorDataset(images, targets), batch_size=4)  # (x, y): no indices
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(ConfigError, match="needs sample indices"):
        trainer.fit(module, train_dataloaders=pairs)


def test_crd_sample_indices_beyond_train_size_are_refused_before_the_step(make_cfg):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from kd_lightning.pipeline import build_terms
    from kd_lightning.schemes import Offline

    images, targets = torch.randn(8, 1, 8, 8), torch.arange(8) % 2
    module = Offline(student=build_model("convnet_tiny", 2, 1), teacher=build_model("convnet_large", 2, 1),
                     terms=build_terms(make_cfg("distill=[crd]")), num_classes=2, example_input=images[:2],
                     train_size=6, train_targets=targets[:6], optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    # Indices of the whole data set, not of a 6-sample training split.
    loader = DataLoader(TensorDataset(images, targets, torch.arange(8)), batch_size=8)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(ConfigError, match=r"distill\.crd got sample index 7 \(min 0\).*6 rows"):
        trainer.fit(module, train_dataloaders=loader)


def test_non_finite_loss_stops_the_run_and_names_the_term(make_cfg):
    # A zero temperature divides the logits by zero: the KD term turns NaN on the first step.
    with pytest.raises(ConfigError, match=r"Loss 'kd' became NaN or infinite at training step 0.*distill\.kd\.weight"):
        run(make_cfg("baseline=false", "distill.kd.temperature=0.0"))


def test_a_broken_init_stage_names_its_terms_init_lr():
    from kd_lightning.schemes.watch import remedy

    assert "distill.ft.init_lr" in remedy("ft_init")
