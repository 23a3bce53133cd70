"""The real `kd-train` command: errors without tracebacks, DDP on CPU, Hydra multirun with W&B offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "callbacks=none"]


def kd_train(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "KD_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": str(tmp_path)}
    # The console script, as the README runs it (it resolves the config directory differently from -m).
    command = [str(Path(sys.executable).with_name("kd-train"))]
    return subprocess.run([*command, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_config_error_prints_one_paragraph_and_no_traceback(tmp_path):
    result = kd_train(tmp_path, "student.name=resnet9", "hydra.run.dir=run", timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "kd-train: error: Unknown model 'resnet9'" in result.stderr
    assert "resnet8x4" in result.stderr
    assert not (tmp_path / "cache").exists(), "a bad student name must fail before any teacher trains"


@pytest.mark.slow
def test_ddp_on_cpu_with_two_gloo_processes(tmp_path):
    # CRD's memory bank is gathered across ranks; FT's init stage leaves parameters without gradients
    # in each stage, which DDP refuses unless the scheme takes them out of the gradient set.
    result = kd_train(tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "logger=csv",
                      "distill=[kd,crd,ft]", "scheme.ce_weight=0.1", "distill.ft.init_epochs=1", "hydra.run.dir=run",
                      *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["world_size"] == 2
    assert list((tmp_path / "run" / "csv" / "init").rglob("metrics.csv")), "the init stage ran"
    # Numerical agreement with one process is tests/test_ddp.py's job; here: the command line gets there.


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_directory_and_closed_wandb_run(tmp_path):
    result = kd_train(tmp_path, "-m", "distill=kd,at", "seed=0,1", "baseline=false", "logger=wandb",
                      "logger.wandb.offline=true", "hydra.sweep.dir=sweep", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert len(jobs) == 4
    grid, losses = set(), set()
    for job in jobs:
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        grid.add((("kd" if "distill=kd" in overrides else "at"), ("seed=1" in overrides)))
        losses.add(json.loads((job / "results.json").read_text())["student_metrics"]["test/loss"])
        runs = list((job / "wandb").glob("offline-run-*"))
        # the teacher is trained (and cached) by the first job only; every job has its own student run
        assert len(runs) in (1, 2)
        assert all(list(run.glob("run-*.wandb")) for run in runs)
    assert len(list((tmp_path / "cache" / "stages").glob("teacher-*.pt"))) == 1
    # Each job ran its own point of the grid and trained its own student (no job repeated another's result).
    assert len(grid) == 4 and len(losses) == 4
