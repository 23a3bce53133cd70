"""Re-running a sweep into its directory: jobs found by config hash are skipped, failed ones rerun (issue #9.4)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback

from kd_lightning.errors import ConfigError
from kd_lightning.sweeps.identity import config_hash, job_record
from wandb_offline import run_config, run_record

ROOT = Path(__file__).resolve().parents[1]
RETURNED: list[tuple[str, float]] = []  # (seed override, value handed to the sweeper), filled by ReturnProbe


class ReturnProbe(Callback):
    """A Hydra callback that records what each job returned to the sweeper (what Optuna would receive)."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if job_return.status == JobStatus.COMPLETED:
            seed = next(item for item in job_return.overrides if item.startswith("seed="))
            RETURNED.append((seed, job_return.return_value))


def test_config_hash_names_the_settings_not_the_job_directory(make_cfg):
    first = make_cfg("paths.output_dir=/sweep/0", "paths.cache_dir=/cache/a", "logger=csv")
    renumbered = make_cfg("paths.output_dir=/elsewhere/7", "paths.cache_dir=/cache/b", "logger=csv")
    # The CSV logger's save_dir interpolates the output dir, so the job number reaches deep into the config.
    assert first.logger.csv.save_dir != renumbered.logger.csv.save_dir
    assert config_hash(first) == config_hash(renumbered)
    for changed in ("seed=1", "distill.kd.temperature=2", "trainer.max_epochs=2", "logger=none"):
        assert config_hash(make_cfg("logger=csv", changed)) != config_hash(first), changed


def in_process_sweep(tmp_path: Path, monkeypatch, seeds: str) -> int:
    from hydra.core.global_hydra import GlobalHydra

    from kd_lightning import train

    monkeypatch.setattr(sys, "argv", ["kd-train", "-m", f"seed={seeds}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                      f"paths.cache_dir={tmp_path / 'cache'}",
                                      f"+hydra.callbacks.probe._target_={__name__}.ReturnProbe"])
    try:
        train.main()
    except SystemExit as exit_info:
        return int(exit_info.code)
    finally:
        GlobalHydra.instance().clear()
    return 0


def test_a_rerun_sweep_skips_finished_configs_by_hash_and_reruns_the_failed_one(tmp_path, monkeypatch):
    # pipeline.run replaced by one that writes results.json as the real one does (job record included);
    # seed 1 fails until `fixed` exists, as a job with a missing teacher checkpoint does.
    import kd_lightning.pipeline

    trained = []

    def run(cfg):
        trained.append(cfg.seed)
        if cfg.seed == 1 and not (tmp_path / "fixed").exists():
            raise ConfigError("Teacher checkpoint 'teacher.pt' does not exist.")
        results = {**job_record(cfg), "student_metrics": {"val/acc": 0.1 * cfg.seed + 0.05,
                                                           "test/acc": 0.1 * cfg.seed + 0.01}}
        Path(cfg.paths.output_dir, "results.json").write_text(json.dumps(results))
        return results

    monkeypatch.setattr(kd_lightning.pipeline, "run", run)
    RETURNED.clear()
    sweep = tmp_path / "sweep"
    assert in_process_sweep(tmp_path, monkeypatch, "0,1") == 1
    assert trained == [0, 1] and json.loads((sweep / "failures.json").read_text())["failed"] == 1
    seed0_result = sweep / "0" / "results.json"
    os.utime(seed0_result, (1, 1))
    (tmp_path / "fixed").touch()

    # Renumbered: seed=2 is job 0 now, in the directory that holds seed 0's result; seed 0 is job 2.
    RETURNED.clear()
    assert in_process_sweep(tmp_path, monkeypatch, "2,1,0") == 0
    assert trained == [0, 1, 2, 1], "seed 0 must not train again, seed 1 must"
    assert sorted(RETURNED) == [("seed=0", 0.05), ("seed=1", pytest.approx(0.15)), ("seed=2", pytest.approx(0.25))]
    logs = {job: (sweep / job / "train.log").read_text() for job in ("0", "1", "2")}
    displaced = next((sweep / "displaced").glob("*/results.json"))
    assert f"job 2: result exists for config {json.loads(displaced.read_text())['config_hash']} " in logs["2"]
    assert f"({displaced.parent}), skipped" in logs["2"]
    assert "job 1: config " in logs["1"] and f"failed before ({sweep / '1'}), rerun" in logs["1"]
    assert "moved to" in logs["0"]
    # Seed 0's result was moved, not rewritten, and still names its own overrides.
    assert displaced.stat().st_mtime == 1 and "seed=0" in json.loads(displaced.read_text())["overrides"]
    assert "seed=2" in yaml.safe_load((sweep / "0" / ".hydra" / "overrides.yaml").read_text())
    assert json.loads((sweep / "failures.json").read_text())["failed"] == 0
    assert not list(sweep.rglob("error.json"))

    from kd_lightning.sweeps.report import collect

    (row,) = collect(sweep)
    assert sorted(row.accs) == pytest.approx([1, 11, 21])  # three configs, each once


QUICK = ["data=synthetic", "data.train_size=128", "data.val_size=64", "data.test_size=64", "student=convnet_tiny",
         "teacher.model.name=convnet_tiny", "baseline=false", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
         "callbacks=none", "logger=wandb", "logger.wandb.offline=true"]


def kd_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "KD_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([str(Path(sys.executable).with_name("kd-train")), "-m", *args, *QUICK,
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_real_sweep_rerun_trains_only_the_fixed_job_and_kd_report_logs_a_wandb_summary(tmp_path):
    sweep = tmp_path / "sweep"
    first = kd_train(tmp_path, "teacher.checkpoint=null,teacher.pt")
    assert first.returncode == 1 and "Teacher checkpoint 'teacher.pt' does not exist" in first.stderr
    (tmp_path / "teacher.pt").write_bytes((sweep / "0" / "student.pt").read_bytes())  # same architecture
    started = time.time()
    time.sleep(0.05)
    second = kd_train(tmp_path, "teacher.checkpoint=teacher.pt,null")  # renumbered, as a longer sweep would
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "job 1: result exists for config" in log and "skipped" in log
    assert "job 0: config" in log and "failed before" in log and "rerun" in log
    # Nothing trained but the fixed job (in directory 0): every other file predates the second run.
    fresh = [path for path in sweep.rglob("*") if path.is_file() and path.stat().st_mtime > started
             and not path.is_relative_to(sweep / "0") and ".hydra" not in path.parts
             and path.suffix != ".log" and path.name not in ("failures.json", "multirun.yaml")]
    assert fresh == []
    results = [json.loads(path.read_text()) for path in sorted(sweep.rglob("results.json"))]
    assert len(results) == 2 and len({result["config_hash"] for result in results}) == 2

    # Every job run is in the sweep's group with the job's resolved config.
    job_runs = sorted(sweep.rglob("offline-run-*"))
    assert len(job_runs) == 3  # the first job's teacher and student, the fixed job's student
    for run_dir in job_runs:
        record = run_record(run_dir)
        config = run_config(run_dir)
        assert record.run_group == "sweep" and record.job_type in ("teacher", "student")
        assert config["data"]["train_size"] == 128 and config["student"]["name"] == "convnet_tiny"

    from kd_lightning.sweeps.report import main as kd_report

    assert kd_report([str(sweep)]) == 0
    (summary,) = sorted((sweep / "wandb").glob("offline-run-*"))
    record = run_record(summary)
    assert (record.run_group, record.job_type, record.project) == ("sweep", "report", "kd_lightning")
    (table_file,) = (summary / "files" / "media" / "table").glob("report_*.table.json")
    table = json.loads(table_file.read_text())
    accs = {next(item for item in result["overrides"] if item.startswith("teacher.checkpoint=")):
            100 * result["student_metrics"]["test/acc"] for result in results}
    assert sorted(row[0] for row in table["data"]) == sorted(accs)
    for row in table["data"]:
        assert row[2] == 1 and row[3] == pytest.approx(accs[row[0]])
    assert list((summary / "files" / "media" / "images").glob("plot_*.png"))
