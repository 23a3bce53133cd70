"""Loggers write what they claim: CSV and TensorBoard files, and a real offline W&B run."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from kd_lightning.pipeline import run


def _csv_columns(root: Path, phase: str) -> set[str]:
    metrics_file = next((root / "csv" / phase).rglob("metrics.csv"))
    with metrics_file.open() as handle:
        return set(next(csv.reader(handle)))


def test_csv_logger_records_the_documented_names(make_cfg, tmp_path):
    run(make_cfg("logger=csv", "baseline=false", "distill=[kd,at]", "scheme.ce_weight=0.1", "trainer.log_every_n_steps=1"))
    columns = _csv_columns(tmp_path / "out", "student")
    assert {"train/loss", "train/ce", "train/kd", "train/at", "val/acc", "val/acc_best", "test/acc"} <= columns
    assert {"train/loss", "val/acc", "test/acc"} <= _csv_columns(tmp_path / "out", "teacher")


def test_tensorboard_logger_writes_event_files(make_cfg, tmp_path):
    run(make_cfg("logger=tensorboard", "baseline=false"))
    assert list((tmp_path / "out" / "tensorboard" / "student").rglob("events.out.tfevents.*"))


def test_wandb_offline_writes_a_syncable_run_with_config_and_metrics(make_cfg, tmp_path, monkeypatch):
    import wandb  # a hard dependency: its absence must fail this test, not skip it

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "out"))
    run(make_cfg("logger=wandb", "logger.wandb.offline=true", "baseline=false", "trainer.log_every_n_steps=1"))
    assert wandb.run is None, "every phase must close its W&B run"
    run_dirs = sorted((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2  # teacher and student phases, one run each
    for run_dir in run_dirs:
        assert list(run_dir.glob("run-*.wandb")), "the binary run file `wandb sync` uploads"
    student_dir = max(run_dirs, key=lambda path: path.stat().st_mtime)
    # Offline runs keep config and history inside the binary run file (protobuf records, strings stored raw).
    blob = next(student_dir.glob("run-*.wandb")).read_bytes()
    for name in (b"convnet_tiny", b"distill", b"train/loss", b"train/kd", b"val/acc", b"test/acc"):
        assert name in blob, name
    sync = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", str(student_dir)],
                          capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0 and "Would sync 1 run" in sync.stdout + sync.stderr


def test_training_values_are_logged_only_where_something_reads_them(monkeypatch):
    # Lightning writes step-level values at logging steps only, and callbacks read `callback_metrics` after the
    # epoch's last batch and the fit's last step; a `self.log` anywhere else is Python work nobody reads.
    import lightning as L
    import torch

    from kd_lightning.data import SyntheticDataModule
    from kd_lightning.losses.terms import KD
    from kd_lightning.models import build_model
    from kd_lightning.schemes import Offline
    from kd_lightning.schemes.base import DistillationModule

    datamodule = SyntheticDataModule(num_classes=4, image_size=8, train_size=64, val_size=8, test_size=8, batch_size=8)
    module = Offline(student=build_model("convnet_tiny", num_classes=4, in_channels=datamodule.in_channels),
                     teacher=build_model("convnet_tiny", num_classes=4, in_channels=datamodule.in_channels),
                     terms={"kd": KD(weight=0.9, temperature=4.0)}, num_classes=4, ce_weight=0.1,
                     example_input=datamodule.example_input(),
                     optimizer=lambda parameters: torch.optim.SGD(parameters, lr=0.01))
    logged_at: list[int] = []
    log = DistillationModule.log

    def counting_log(self, name, *args, **kwargs):
        if name == "train/loss":
            logged_at.append(self.trainer.global_step)
        return log(self, name, *args, **kwargs)

    monkeypatch.setattr(DistillationModule, "log", counting_log)
    # 8 batches an epoch, 11 steps: logging steps 3, 6, 9, the first epoch's last batch (8), the fit's last (11).
    trainer = L.Trainer(max_steps=11, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=3)
    trainer.fit(module, datamodule=datamodule)
    assert [step + 1 for step in logged_at] == [3, 6, 8, 9, 11]
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
