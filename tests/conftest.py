"""Shared fixtures: Hydra configs composed from conf/ into tmp_path, with fast trainer settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
os.environ.setdefault("WANDB_SILENT", "true")
# The suite runs under pytest-xdist with one worker per core and its tensors are small: a second intra-op
# thread per worker only adds synchronisation and contention.
torch.set_num_threads(1)

FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "callbacks=none",
    "logger=none",
]


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose `train.yaml` with overrides; outputs and the teacher cache go to tmp_path."""

    def _make(*overrides: str, fast: bool = True) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                "train",
                overrides=[
                    f"paths.output_dir={tmp_path / 'out'}",
                    f"paths.cache_dir={tmp_path / 'cache'}",
                    f"paths.data_dir={tmp_path / 'data'}",
                    *(FAST if fast else []),
                    *overrides,
                ],
            )

    return _make


class _LossRecorder(L.Callback):
    def __init__(self, losses: dict[str, list[float]]) -> None:
        self.losses = losses

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        phase = Path(trainer.default_root_dir).name
        self.losses.setdefault(phase, []).append(float(outputs["loss"]))


@pytest.fixture
def recorded_losses(monkeypatch) -> dict[str, list[float]]:
    """Every training step's total loss of every `pipeline.run` phase in this test, keyed by phase name."""
    import kd_lightning.pipeline as pipeline

    losses: dict[str, list[float]] = {}
    original = pipeline.build_callbacks
    monkeypatch.setattr("kd_lightning.trainer_setup.build_callbacks",
                        lambda cfg, has_logger: [*original(cfg, has_logger), _LossRecorder(losses)])
    return losses
