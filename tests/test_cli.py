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


@pytest.mark.parametrize(("argument", "expected"), [
    ("distill=[kdd]", ["Unknown option 'kdd' for config group 'distill'", "closest match is 'kd'.",
                       "Valid options: ab, at, cc,"]),
    ("trainer.max_epochs=abc", ["trainer.max_epochs='abc' must be a whole number ≥ 1", "trainer.max_epochs=30"]),
    ("optimizer.lr=-1", ["optimizer.lr=-1 must be a number > 0", "e.g. optimizer.lr="]),
])
def test_reported_bad_input_exits_2_with_one_paragraph(tmp_path, argument, expected):
    result = kd_train(tmp_path, argument, "hydra.run.dir=run", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    message = result.stderr.strip()
    assert message.startswith("kd-train: error: ") and "\n" not in message, message
    for text in expected:
        assert text in message
    assert not (tmp_path / "cache").exists(), "bad input must fail before any teacher trains"


@pytest.mark.slow
def test_sweep_runs_every_job_and_records_the_failed_one(tmp_path):
    result = kd_train(tmp_path, "-m", "student.name=convnet_tiny,resnet9,convnet_small", "baseline=false",
                      "hydra.sweep.dir=sweep", *QUICK)
    assert result.returncode == 1, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    for finished in ("0", "2"):
        assert json.loads((sweep / finished / "results.json").read_text())["student"]["name"] != "resnet9"
        assert not (sweep / finished / "error.json").exists()
    assert not (sweep / "1" / "results.json").exists()
    error = json.loads((sweep / "1" / "error.json").read_text())
    assert error["job"] == 1 and "student.name=resnet9" in error["overrides"]
    assert error["error_type"] == "ConfigError" and error["message"].startswith("Unknown model 'resnet9'")
    failures = json.loads((sweep / "failures.json").read_text())
    assert failures["failed"] == 1 and [job["job"] for job in failures["jobs"]] == [1]
    assert "1 of 3 sweep jobs failed; every job ran" in result.stderr
    assert "job 1 (student.name=resnet9): ConfigError: Unknown model 'resnet9'" in result.stderr
    assert "Traceback" not in result.stderr


def test_unexpected_error_in_a_sweep_job_is_recorded_and_the_others_run(tmp_path, monkeypatch, capsys):
    # In process, with pipeline.run replaced: a torch RuntimeError in the middle job of three.
    from hydra.core.global_hydra import GlobalHydra

    import kd_lightning.pipeline
    from kd_lightning import train

    seeds_run = []

    def run_that_fails_for_seed_1(cfg):
        seeds_run.append(cfg.seed)
        if cfg.seed == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return {"student_metrics": {"test/acc": 0.5}}

    monkeypatch.setattr(kd_lightning.pipeline, "run", run_that_fails_for_seed_1)
    monkeypatch.setattr(sys, "argv", ["kd-train", "-m", "seed=0,1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                      f"paths.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(SystemExit) as exit_info:
        try:
            train.main()
        finally:
            GlobalHydra.instance().clear()
    assert exit_info.value.code == 1
    assert seeds_run == [0, 1, 2]
    error = json.loads((tmp_path / "sweep" / "1" / "error.json").read_text())
    assert error["error_type"] == "RuntimeError" and "illegal memory access" in error["message"]
    assert "run_that_fails_for_seed_1" in error["traceback"]
    assert not any((tmp_path / "sweep" / job / "error.json").exists() for job in ("0", "2"))
    assert json.loads((tmp_path / "sweep" / "failures.json").read_text())["failed"] == 1
    assert "job 1 (seed=1): RuntimeError: CUDA error" in capsys.readouterr().err


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
    assert list((tmp_path / "run" / "csv" / "student_init").rglob("metrics.csv")), "the init stage ran"
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
