"""The stage cache heals a damaged file, and jobs started together train a missing stage once."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import SoftFileLease

from kd_lightning.pipeline import run, stage_config, stage_file, stage_recipe
from kd_lightning.stage_cache import LEASE_SECONDS
from kd_lightning.stages import plan_stages
from kd_lightning.teachers import recipe_key

ROOT = Path(__file__).resolve().parents[1]


def teacher_file(cfg) -> Path:
    """Where the run's first stage (the teacher, which reads no other stage) is cached."""
    stage = plan_stages(cfg)[0]
    stage_cfg = stage_config(cfg, stage)
    return stage_file(stage_cfg, stage, recipe_key(stage_recipe(stage_cfg, stage, {})))


def test_a_truncated_stage_file_is_retrained_and_replaced_with_a_one_line_warning(make_cfg, tmp_path, caplog):
    first = run(make_cfg("baseline=false"))
    cached = teacher_file(make_cfg("baseline=false"))
    assert first["teacher"]["source"] == f"trained, cached at {cached}"
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])  # what a full disk or a killed copy leaves

    with caplog.at_level(logging.WARNING, logger="kd_lightning.stage_cache"):
        healed = run(make_cfg("baseline=false"))
    warnings = [record.getMessage() for record in caplog.records if record.name == "kd_lightning.stage_cache"]
    assert len(warnings) == 1 and str(cached) in warnings[0] and "damaged" in warnings[0]
    assert "\n" not in warnings[0]
    assert healed["teacher"]["source"] == f"trained, cached at {cached}"
    assert healed["teacher"]["metrics"] == first["teacher"]["metrics"]  # the same recipe, trained again
    assert run(make_cfg("baseline=false"))["teacher"]["source"] == f"cache {cached}"  # the file was replaced
    assert sorted(p.name for p in cached.parent.iterdir() if p.name.startswith("teacher")) == [cached.name]


HOLD = "import sys, time; from filelock import SoftFileLease; lock = SoftFileLease(sys.argv[1], lease_duration={}); " \
       "lock.acquire(); print('held', flush=True); time.sleep(600)"


def test_a_crashed_holder_of_the_stage_lock_does_not_block_the_next_job(make_cfg):
    cfg = make_cfg("baseline=false")
    lock = f"{teacher_file(cfg)}.lock"
    Path(lock).parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(LEASE_SECONDS), lock], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)  # no release: its marker stays behind
    holder.wait()
    assert Path(lock).exists()
    start = time.monotonic()
    assert run(cfg)["teacher"]["source"].startswith("trained")
    assert time.monotonic() - start < LEASE_SECONDS  # a dead pid on this host is replaced at once


def kd_train(run_dir: Path, log: Path, *overrides: str) -> subprocess.Popen:
    command = "import sys; from kd_lightning.train import main; sys.argv[0] = 'kd-train'; main()"
    return subprocess.Popen([sys.executable, "-c", command, *overrides, f"hydra.run.dir={run_dir}"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"})


@pytest.mark.slow
def test_two_jobs_with_a_cold_stage_cache_train_the_teacher_once(make_cfg, tmp_path):
    overrides = ["baseline=false", "logger=none", "callbacks=none", "trainer.enable_progress_bar=false",
                 "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                 "trainer.limit_test_batches=1", f"paths.cache_dir={tmp_path / 'cache'}"]
    lock = SoftFileLease(f"{teacher_file(make_cfg(*overrides))}.lock", lease_duration=LEASE_SECONDS)
    lock.acquire()  # so that both jobs find the stage missing and being trained, however fast each starts
    logs = [tmp_path / f"job{index}.log" for index in (0, 1)]
    jobs = [kd_train(tmp_path / f"job{index}", logs[index], *overrides) for index in (0, 1)]
    try:
        deadline = time.monotonic() + 240
        while not all("waiting for its file" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(job.poll() is None for job in jobs), \
                [log.read_text()[-2000:] for log in logs]
            time.sleep(0.5)
    finally:
        lock.release()
    for job, log in zip(jobs, logs):
        assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
    results = [json.loads((tmp_path / f"job{index}" / "results.json").read_text()) for index in (0, 1)]
    sources = sorted(result["teacher"]["source"].split(" ")[0] for result in results)
    assert sources == ["cache", "trained,"]  # one job trained the teacher, the other read its file
    assert results[0]["teacher"]["metrics"]["test/acc"] == results[1]["teacher"]["metrics"]["test/acc"]
    assert len(list((tmp_path / "cache" / "stages").glob("teacher-*.pt"))) == 1


def test_only_single_process_runs_take_the_stage_lock():
    from omegaconf import OmegaConf

    from kd_lightning.stage_cache import single_process

    def trainer(**settings):
        return OmegaConf.create({"trainer": {"devices": 1, "num_nodes": 1, **settings}})

    assert all(single_process(trainer(devices=devices)) for devices in (1, "1", [0]))
    # A DDP job's ranks train the stage together: one rank waiting on another's lock would never start.
    assert not any(single_process(trainer(devices=devices)) for devices in (2, "auto", [0, 1], -1))
    assert not single_process(trainer(num_nodes=2))
