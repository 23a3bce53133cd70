"""Hydra's Optuna sweeper and submitit launchers, run for real on tiny data; the checks before a sweep starts."""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from kd_lightning import train
from kd_lightning.sweeps import best
from kd_lightning.errors import ConfigError
from kd_lightning.sweeps.checks import check_launcher, check_sweep

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(ROOT / "conf")
TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_test_batches=1",
        "trainer.enable_progress_bar=false", "callbacks=none", "logger=none", "teacher.model.name=convnet_tiny"]


def hydra_cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def kd_train_in_process(monkeypatch, tmp_path, *args: str) -> int:
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["kd-train", *args])
    try:
        train.main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def test_checked_settings_are_the_ones_hydra_composes():
    cfg = hydra_cfg("hparams_search=kd_optuna")
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.sampler.seed == 1234
    assert set(cfg.hydra.sweeper.params) == {"distill.kd.temperature", "distill.kd.weight", "optimizer.lr"}
    assert cfg.evaluate_test is False and cfg.optimized_metric == "val/acc"
    slurm = hydra_cfg("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.nodes, slurm.tasks_per_node, slurm.gpus_per_node) == (2, 4, 4)
    assert hydra_cfg("hydra/launcher=parallel").hydra.launcher._target_.endswith("JoblibLauncher")


# --- bad input, refused before any job --------------------------------------------------------------------
def with_sweeps(cfg, *sweeps: str):
    # compose() runs in RUN mode, which refuses sweep overrides; the multirun config lists them like this.
    cfg.hydra.overrides.task = [*cfg.hydra.overrides.task, *sweeps]
    return cfg


def test_a_search_over_a_key_the_config_lacks_names_the_closest_key():
    expected = r"names distill\.kd\.temprature, which is not a key.*closest existing key is distill\.kd\.temperature"
    in_params = hydra_cfg("hparams_search=kd_optuna", '++hydra.sweeper.params={distill.kd.temprature:"interval(1.0, 8.0)"}')
    with pytest.raises(ConfigError, match=r"in hydra\.sweeper\.params .*" + expected):
        check_sweep(in_params)
    on_command_line = with_sweeps(hydra_cfg("hparams_search=kd_optuna"), "distill.kd.temprature=interval(1.0,8.0)")
    with pytest.raises(ConfigError, match=r"in the command line " + expected):
        check_sweep(on_command_line)
    check_sweep(with_sweeps(hydra_cfg("hparams_search=kd_optuna"), "student=choice(convnet_tiny,resnet8)",
                            "optimizer.lr=interval(0.01,0.1)", "+distill.kd.new_key=interval(0.0,1.0)"))


def test_kd_train_refuses_a_bad_search_before_any_trial(monkeypatch, tmp_path, capsys):
    for bad in ("distill.kd.temprature=interval(1.0,8.0)", "optimized_metric=test/acc"):
        sweep = tmp_path / "sweep"
        code = kd_train_in_process(monkeypatch, tmp_path, "hparams_search=kd_optuna", bad, f"hydra.sweep.dir={sweep}",
                                   *TINY)
        assert code == 2, bad
        assert "kd-train: error:" in capsys.readouterr().err
        assert not sweep.exists() and not (tmp_path / "cache").exists(), bad


@pytest.mark.parametrize(("overrides", "expected"), [
    (["trainer.devices=4"], r"trainer\.strategy=auto cannot use 4 devices.*trainer=ddp"),
    (["trainer=ddp", "trainer.devices=4", "hydra.launcher.tasks_per_node=2"],
     r"1 node\(s\) × 2 task\(s\).*trainer\.devices=4.*hydra\.launcher\.tasks_per_node=4"),
    (["trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.nodes=1"], r"hydra\.launcher\.nodes=2"),
    (["trainer=ddp", "hydra.launcher.gpus_per_node=1"], r"needs 2 GPU\(s\) per node.*gpus_per_node=2"),
    (["trainer.devices=auto"], r"must be a number of devices per node, not 'auto'"),
])
def test_slurm_settings_the_strategy_cannot_use_are_refused(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        check_launcher(hydra_cfg("hydra/launcher=slurm", *overrides))


def test_slurm_settings_that_agree_pass():
    check_launcher(hydra_cfg("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"))
    check_launcher(hydra_cfg("hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null"))  # one CPU task
    check_launcher(hydra_cfg("hydra/launcher=submitit_local"))


def test_every_command_in_the_cluster_docs_composes_and_passes_the_checks():
    text = (ROOT / "docs" / "cluster.md").read_text()
    commands = [line.split("kd-train ", 1)[1] for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                for line in block.splitlines() if "kd-train " in line]
    assert len(commands) == 8
    for command in commands:
        args = [arg for arg in shlex.split(command.replace("${SLURM_JOB_ID}", "123")) if arg != "-m"]
        overrides = [arg.replace(",", "").split("=", 1)[0] + "=" + arg.split("=", 1)[1].split(",")[0]
                     if "," in arg and "[" not in arg else arg for arg in args]  # a sweep's first value
        cfg = hydra_cfg(*overrides)
        with open_dict(cfg):  # what a launcher sets for its job before `--cfg job --resolve` would print it
            cfg.hydra.job.num, cfg.hydra.runtime.output_dir = 0, "job"
        HydraConfig.instance().set_config(cfg)
        OmegaConf.to_container(cfg, resolve=True)
        check_sweep(cfg)
        if "trainer.num_nodes=2" in command and "hydra/launcher=slurm" in command:
            assert (cfg.hydra.launcher.nodes, cfg.hydra.launcher.tasks_per_node) == (2, 4)


# --- Optuna, for real --------------------------------------------------------------------------------------
def trial_results(sweep: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(sweep.glob("*/results.json")) if path.parts[-2] != "best"]


@pytest.mark.slow
def test_optuna_study_continues_tests_nothing_and_kd_best_tests_the_chosen_trial(monkeypatch, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    search = ["hparams_search=kd_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
              f"hydra.sweep.dir={sweep}", *TINY]
    assert kd_train_in_process(monkeypatch, tmp_path, *search) == 0
    assert kd_train_in_process(monkeypatch, tmp_path, *search) == 0  # continues the study in optuna.db
    with sqlite3.connect(sweep / "optuna.db") as db:
        states = [state for (state,) in db.execute("SELECT state FROM trials")]
        values = sorted(value for (value,) in db.execute("SELECT value FROM trial_values"))
    assert states == ["COMPLETE"] * 4
    trials = trial_results(sweep)
    assert len(trials) == 4, "the continued study's trials must not overwrite the first run's"
    for trial in trials:  # no stage of any trial was evaluated on the test split
        assert not [key for stage in trial["stages"].values() for key in stage["metrics"] if key.startswith("test/")]
    assert sorted(trial["student_metrics"]["val/acc"] for trial in trials) == pytest.approx(values, abs=1e-7)
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.best_value == pytest.approx(max(values))

    capsys.readouterr()
    best.main([str(sweep)])
    chosen = json.loads((sweep / "best" / "results.json").read_text())
    overrides = OmegaConf.load(sweep / "best" / ".hydra" / "overrides.yaml")
    assert {f"{key}={value}" for key, value in results.best_params.items()} <= set(overrides)
    assert not any(text.startswith("hparams_search") for text in overrides)
    # The rerun is the best trial: same validation accuracy, and now the test metrics of it alone.
    assert chosen["student_metrics"]["val/acc"] == pytest.approx(results.best_value, abs=1e-7)
    assert "test/acc" in chosen["student_metrics"] and "test/acc" in chosen["teacher"]["metrics"]
    assert "rerun val/acc=" in capsys.readouterr().out


# --- submitit, for real ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_submitit_local_sweep_runs_each_job_in_its_own_process_and_records_failures(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "KD_CACHE_DIR": str(tmp_path / "cache"), "WANDB_SILENT": "true"}
    result = subprocess.run([sys.executable, "-m", "kd_lightning.train", "-m", "hydra/launcher=submitit_local",
                             "student.name=convnet_tiny,resnet9", "baseline=false", "hydra.sweep.dir=sweep",
                             "trainer.limit_val_batches=1", *TINY],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    sweep = tmp_path / "sweep"
    assert result.returncode == 1, result.stderr[-3000:]
    assert "1 of 2 sweep jobs failed; every job ran" in result.stderr
    finished = json.loads((sweep / "0" / "results.json").read_text())
    assert "test/acc" in finished["student_metrics"] and "val/acc" in finished["student_metrics"]
    error = json.loads((sweep / "1" / "error.json").read_text())  # written in the job's own process
    assert error["error_type"] == "ConfigError" and "resnet9" in error["message"]
    assert json.loads((sweep / "failures.json").read_text())["failed"] == 1
    job_logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(job_logs) == 2 and all("submitit INFO" in log.read_text() for log in job_logs)


# --- a requeued SLURM job resumes ---------------------------------------------------------------------------
class _Preempt(Exception):
    pass


@pytest.mark.slow
def test_a_requeued_job_resumes_from_its_last_checkpoint(monkeypatch, tmp_path):
    import lightning as L

    import kd_lightning.pipeline as pipeline

    steps: list[int] = []
    preempt = {"at_epoch": None}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.current_epoch == preempt["at_epoch"]:
                raise _Preempt
            steps.append(trainer.global_step)

    original = pipeline.build_callbacks
    monkeypatch.setattr("kd_lightning.trainer_setup.build_callbacks", lambda cfg, has_logger: [*original(cfg, has_logger), Watch()])
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the pre-emption reaches the test instead of Hydra's exit(1)
    common = ["baseline=false", "trainer.max_epochs=2", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
              "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "logger=none",
              "teacher.model.name=convnet_tiny", "teacher.max_epochs=1"]

    def run_job(run_dir: str) -> None:
        monkeypatch.setattr(sys, "argv", ["kd-train", *common, f"hydra.run.dir={tmp_path / run_dir}"])
        train.main()

    run_job("uninterrupted")
    steps.clear()
    preempt["at_epoch"] = 1
    with pytest.raises(_Preempt):
        run_job("requeued")
    assert steps == [0, 1]  # the student's first epoch ran; the job was stopped at the second
    preempt["at_epoch"], steps[:] = None, []
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    run_job("requeued")
    assert steps == [2, 3], "the requeued job must continue at its checkpoint, not start over"
    weights = [torch.load(tmp_path / run / "student.pt", weights_only=True)["state_dict"]
               for run in ("uninterrupted", "requeued")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


# --- what a trial skips, and what a later run fills in -----------------------------------------------------
def test_a_trial_tests_nothing_and_a_testing_run_tests_the_cached_teacher_it_trained(make_cfg, tmp_path):
    from kd_lightning.pipeline import run
    from kd_lightning.validate import check_settings

    with pytest.raises(ConfigError, match=r"torch_threads=0 must be a whole number ≥ 1 or null"):
        check_settings(make_cfg("torch_threads=0"))
    trial = run(make_cfg("evaluate_test=false", "torch_threads=2", "baseline=false", "teacher.model.name=convnet_tiny"))
    try:
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert not [key for stage in trial["stages"].values() for key in stage["metrics"] if key.startswith("test/")]
    assert "val/acc" in trial["student_metrics"]
    later = run(make_cfg("baseline=false", "teacher.model.name=convnet_tiny"))  # same cache: the trial's teacher
    assert later["teacher"]["source"].startswith("cache")
    fresh = run(make_cfg("baseline=false", "teacher.model.name=convnet_tiny", f"paths.cache_dir={tmp_path / 'fresh'}"))
    assert fresh["teacher"]["source"].startswith("trained")
    assert later["teacher"]["metrics"]["test/acc"] == fresh["teacher"]["metrics"]["test/acc"]
    assert later["student_metrics"]["test/acc"] == fresh["student_metrics"]["test/acc"]
