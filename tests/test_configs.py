"""Every option of every config group composes and instantiates (gpu options: refuse cleanly on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import get_class, instantiate

from kd_lightning.errors import ConfigError
from kd_lightning.pipeline import build_callbacks, build_loggers, build_terms, check_accelerator, construct
from kd_lightning.teacher_cache import cache_options

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(path.relative_to(CONF / group).with_suffix("").as_posix() for path in (CONF / group).rglob("*.yaml"))


class Shape:
    """Stands in for a data module where only the shape matters."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        self.num_classes, self.in_channels = num_classes, in_channels


def test_every_group_has_options():
    for group in ("data", "teacher", "student", "distill", "scheme", "trainer", "logger", "callbacks",
                  "experiment", "debug", "optimizer", "scheduler", "teacher_cache"):
        assert options(group), group


@pytest.mark.parametrize("option", options("teacher_cache"))
def test_teacher_cache_options_compose(make_cfg, option, tmp_path):
    cache = cache_options(make_cfg(f"teacher_cache={option}"))
    assert (cache.storage if cache is not None else "none") == option
    assert cache is None or cache.directory == tmp_path / "cache" / "teacher_outputs"


@pytest.mark.parametrize("option", options("data"))
def test_data_options_instantiate(make_cfg, option):
    datamodule = instantiate(make_cfg(f"data={option}").data)
    assert datamodule.num_classes > 1 and datamodule.in_channels == datamodule.input_shape[0]
    # Images have one or three channels; a feature-vector source (mfeat) as many as its features.
    assert datamodule.in_channels in (1, 3) or len(datamodule.input_shape) == 1
    assert datamodule.default_source in datamodule.sources


@pytest.mark.parametrize("option", options("student"))
def test_student_options_build(make_cfg, option):
    cfg = make_cfg(f"student={option}")
    model = instantiate(cfg.student, num_classes=10, in_channels=3)
    assert model.kd_spec["name"] == cfg.student.name


@pytest.mark.parametrize("option", options("teacher"))
def test_teacher_options_build(make_cfg, option, tmp_path, monkeypatch):
    cfg = make_cfg(f"teacher={option}")
    if cfg.teacher.model.get("weights"):
        # Pretrained torchvision teachers need their file in torch's hub cache; nothing is downloaded.
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        with pytest.raises(ConfigError, match="checkpoints"):
            construct(cfg.teacher.model, num_classes=1000, in_channels=3)
        cfg.teacher.model.weights = None
    model = instantiate(cfg.teacher.model, num_classes=10, in_channels=3)
    assert model.kd_spec["name"] == cfg.teacher.model.name


@pytest.mark.parametrize("option", options("distill"))
def test_distill_options_instantiate_terms(make_cfg, option):
    terms = build_terms(make_cfg(f"distill=[{option}]"))
    # A named combination (e.g. crd_kd) builds the terms its defaults list names.
    members = yaml.safe_load((CONF / "distill" / f"{option}.yaml").read_text()).get("defaults", [])
    assert list(terms) == ([member for member in members if member != "_self_"] or [option])


@pytest.mark.parametrize("option", options("scheme"))
def test_scheme_options_resolve_to_lightning_modules(make_cfg, option):
    import lightning as L

    assert issubclass(get_class(make_cfg(f"scheme={option}").scheme._target_), L.LightningModule)


@pytest.mark.parametrize("group", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_options_instantiate(make_cfg, group):
    for option in options(group):
        cfg = make_cfg(f"{group}={option}")
        optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(2))])
        assert isinstance(optimizer, torch.optim.Optimizer)
        if cfg.get("scheduler"):
            instantiate(cfg.scheduler)(optimizer).step()


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options_instantiate_or_refuse_cleanly(make_cfg, option):
    cfg = make_cfg(f"trainer={option}")
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer=cpu"):
            check_accelerator(cfg.trainer)
        cfg.trainer.accelerator = "cpu"
    trainer = instantiate(cfg.trainer)
    assert trainer.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options_instantiate(make_cfg, option, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg(f"logger={option}")
    loggers = build_loggers(cfg, "student")
    assert len(loggers) == len(cfg.get("logger") or {})


@pytest.mark.parametrize("option", options("callbacks"))
def test_callback_options_instantiate(make_cfg, option):
    cfg = make_cfg(f"callbacks={option}", fast=False)  # fast settings switch the progress bar off
    assert len(build_callbacks(cfg, has_logger=True)) == len(cfg.get("callbacks") or {})


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_options_compose_and_build(make_cfg, option):
    cfg = make_cfg(f"experiment={option}")
    datamodule = instantiate(cfg.data)
    instantiate(cfg.student, num_classes=datamodule.num_classes, in_channels=datamodule.in_channels)
    build_terms(cfg)


@pytest.mark.parametrize("option", options("debug"))
def test_debug_options_compose_and_build_a_trainer(make_cfg, option):
    cfg = make_cfg(f"debug={option}")
    assert cfg.trainer.accelerator == "cpu"
    instantiate(cfg.trainer)
