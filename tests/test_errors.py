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
    # Positive, so it passes the settings check, but it rounds to zero in float32: the logits are divided
    # by zero and the KD term turns NaN on the first step.
    with pytest.raises(ConfigError, match=r"Loss 'kd' became NaN or infinite at training step 0.*distill\.kd\.weight"):
        run(make_cfg("baseline=false", "distill.kd.temperature=1e-46"))


def test_non_finite_watch_names_the_loss_that_broke_first_and_its_step():
    from kd_lightning.schemes.watch import NonFiniteWatch

    watch = NonFiniteWatch(["ce", "kd", "fitnet"])
    nan, finite = torch.tensor(float("nan")), torch.tensor(1.0)
    for step in range(8):
        watch.record("ce", torch.tensor(float("inf")) if step >= 5 else finite, step)
        watch.record("kd", nan if step >= 3 else finite, step)
        watch.record("fitnet", torch.tensor([1.0, nan.item() if step == 6 else 2.0]), step)  # not a scalar
    with pytest.raises(ConfigError, match=r"Loss 'kd' became NaN or infinite at training step 3"):
        watch.raise_if_any()
    assert {name: int(step) for name, step in watch.first_step.items()} == {"ce": 5, "kd": 3, "fitnet": 6}
    NonFiniteWatch(["ce"]).raise_if_any()  # nothing recorded: nothing to raise


@pytest.mark.parametrize(("argv", "message"), [
    (["distill=[kdd]"],
     r"Unknown option 'kdd' for config group 'distill'.*closest match is 'kd'\..*Valid options: ab, at,"),
    (["distill=[kd,att]"], r"'att' for config group 'distill'.*closest match is 'at'\."),
    (["-m", "distill=kd,kdd"], r"'kdd' for config group 'distill'"),
    (["data=cifar1000"], r"'cifar1000' for config group 'data'.*closest match is 'cifar100'\..*synthetic"),
    (["student=resnet57"], r"config group 'student'.*closest match is 'resnet56'\..*wrn_40_2"),
    (["teacher=resnet33x4"], r"config group 'teacher'.*closest match is 'resnet32x4'"),
    (["+experiment=cifar100/resnet32x4_resnet8"],
     r"config group 'experiment'.*closest match is 'cifar100/resnet32x4_resnet8x4'.*imagenet/resnet34_resnet18"),
    (["+experiment=resnet56_resnet20"], r"closest match is 'cifar100/resnet56_resnet20'"),
    (["scheme=ofline"], r"config group 'scheme'.*closest match is 'offline'.*supervised"),
    (["trainer=gpus"], r"config group 'trainer'.*closest match is 'gpu'.*ddp"),
    (["logger=wandbb"], r"config group 'logger'.*closest match is 'wandb'.*tensorboard"),
    (["optimizer=adam"], r"config group 'optimizer'.*closest match is 'adamw'"),
    (["hydra/launcher=joblb"], r"config group 'hydra/launcher'.*Valid options: basic.*plugins"),
    (["studnet=resnet8"], r"'studnet=resnet8' names no config group or setting.*closest match is 'student'.*\+studnet"),
])
def test_unknown_group_option_lists_valid_ones_and_closest(argv, message):
    from kd_lightning.cli_checks import check_command_line
    from kd_lightning.train import CONF_DIR

    with pytest.raises(ConfigError, match=message):
        check_command_line(argv, CONF_DIR)


@pytest.mark.parametrize("argv", [
    ["distill=[kd,at]", "data=cifar100", "student=resnet8x4", "teacher=resnet32x4"],
    ["experiment=cifar100/resnet32x4_resnet8x4"], ["-m", "seed=0,1", "distill=kd,at"], ["distill=glob(k*)"],
    ["~debug"], ["experiment=null", "debug=fdr"], ["student.name=resnet9"], ["+anything=1"], ["distill=[]"],
    ["hydra/launcher=basic", "hydra.run.dir=x"], ["--cfg", "job"], ["--help"], [],
    ["scheme=multi_teacher", "teachers=[convnet_large,convnet_small]"],  # a key a _global_ scheme config adds
])
def test_valid_command_lines_pass_the_group_check(argv):
    from kd_lightning.cli_checks import check_command_line
    from kd_lightning.train import CONF_DIR

    check_command_line(argv, CONF_DIR)


@pytest.mark.parametrize(("overrides", "message"), [
    (["trainer.max_epochs=abc"], r"^Invalid setting: trainer\.max_epochs='abc' must be a whole number ≥ 1 .*"
                                 r"e\.g\. trainer\.max_epochs=30\. Fix it"),
    (["trainer.max_epochs=2.5"], r"trainer\.max_epochs=2\.5 must be a whole number"),
    (["optimizer.lr=-1"], r"optimizer\.lr=-1 must be a number > 0, e\.g\. optimizer\.lr="),
    (["teacher.lr=0"], r"teacher\.lr=0 must be a number > 0 or null"),
    (["teacher.max_epochs=0"], r"teacher\.max_epochs=0 must be a whole number ≥ 1 or null"),
    (["optimizer.weight_decay=-0.1"], r"optimizer\.weight_decay=-0\.1 must be a number ≥ 0"),
    (["optimizer.momentum=1.5"], r"optimizer\.momentum=1\.5 must be a number in \[0, 1\)"),
    (["optimizer=adamw", "optimizer.betas=[0.9,1.5]"], r"optimizer\.betas=\[0\.9, 1\.5\] must be two numbers"),
    (["scheduler=multistep", "scheduler.milestones=[180,150]"],
     r"scheduler\.milestones=\[180, 150\] must be a strictly"),
    (["data.batch_size=0"], r"data\.batch_size=0 must be a whole number ≥ 1"),
    (["data.val_fraction=1.0"], r"data\.val_fraction=1\.0 must be a fraction in \[0, 1\)"),
    (["distill.kd.temperature=0"], r"distill\.kd\.temperature=0 must be a number > 0"),
    (["distill.kd.weight=-1"], r"distill\.kd\.weight=-1 must be a number ≥ 0"),
    (["distill=[rkd]", "distill.rkd.angle_weight=nan"], r"distill\.rkd\.angle_weight=nan must be a number ≥ 0"),
    (["distill=[dkd]", "distill.dkd.warmup_epochs=-1"], r"distill\.dkd\.warmup_epochs=-1 must be a whole number ≥ 0"),
    (["scheme.ce_weight=abc"], r"scheme\.ce_weight='abc' must be a number ≥ 0"),
    (["trainer.limit_train_batches=1.5"], r"trainer\.limit_train_batches=1\.5 must be null \(all\), a whole number"),
    (["trainer.limit_val_batches=-2"], r"trainer\.limit_val_batches=-2 must be null"),
    (["trainer.devices=0"], r"trainer\.devices=0 must be a whole number ≥ 1, -1 \(all\), 'auto'"),
    (["trainer.log_every_n_steps=0"], r"trainer\.log_every_n_steps=0 must be a whole number ≥ 1"),
    (["seed=-1"], r"seed=-1 must be a whole number in \[0, 2\^32\)"),
    (["optimizer.lr=-1", "data.batch_size=0"], r"^Invalid settings: .*optimizer\.lr=-1.*data\.batch_size=0|"
                                               r"^Invalid settings: .*data\.batch_size=0.*optimizer\.lr=-1"),
])
def test_bad_setting_names_key_value_and_fix_before_training(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        run(make_cfg(*overrides))
    assert "scheduler.T_max" not in str(error.value), "T_max follows trainer.max_epochs: name the source once"
    assert not (tmp_path / "cache").exists(), "the check must come before the teacher trains"


@pytest.mark.parametrize("overrides", [
    [], ["trainer.devices=auto"], ["trainer.devices=[0]"], ["trainer.limit_train_batches=0.25"],
    ["trainer.limit_train_batches=0"], ["teacher.lr=null"], ["optimizer=adamw"], ["scheduler=multistep"],
    ["distill=[kd,at,dkd,rkd,crd,dist,vid,fitnet,reviewkd]"], ["optimizer.lr=1"],
])
def test_valid_settings_pass_the_check(make_cfg, overrides):
    from kd_lightning.validate import check_settings

    check_settings(make_cfg(*overrides))


def test_every_shipped_experiment_passes_the_settings_check(make_cfg):
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    from kd_lightning.cli_checks import group_options
    from kd_lightning.train import CONF_DIR
    from kd_lightning.validate import check_settings

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(CONF_DIR))
    experiments = group_options(loader, "experiment")
    assert "cifar100/resnet32x4_resnet8x4" in experiments
    for experiment in experiments:
        check_settings(make_cfg(f"experiment={experiment}", fast=False))


def test_a_broken_init_stage_names_its_terms_init_lr():
    from kd_lightning.schemes.watch import remedy

    assert "distill.ft.init_lr" in remedy("ft_init")
