"""Resume is exact: a run continued from a mid-epoch checkpoint logs the uninterrupted run's losses, bit for bit.

Every registered term (each `conf/distill/*.yaml`) and every scheme is resumed the same way: train with a step
checkpoint, resume from the checkpoint of step RESUME_STEP in a fresh Trainer, and compare the per-step losses
after it (they cross an epoch boundary, a validation and a reshuffle) and the final student weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

import kd_lightning.pipeline as pipeline
from kd_lightning.data import SyntheticDataModule
from kd_lightning.data.resumable import EpochPermutationSampler, ResumableLoader
from kd_lightning.pipeline import run
from kd_lightning.stages import plan_stages
from kd_lightning.teachers import read_weights
from scheme_cases import NAMED_INPUT_CASES, SCHEME_CASES

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"


def case_id(scheme: str, overrides: list[str]) -> str:
    shown = [o.removeprefix("distill=[").removesuffix("]").rsplit(".", 1)[-1] for o in overrides[:1] + overrides[2:]]
    return "-".join([scheme, *shown]) if any(shown) else scheme


CASES = [pytest.param(scheme, overrides, id=case_id(scheme, overrides))
         for scheme, cases in SCHEME_CASES.items() for overrides in cases]
CASES += [pytest.param(scheme, overrides, id=f"{scheme}-named_inputs{index}")
    for index, (scheme, overrides) in enumerate(NAMED_INPUT_CASES)]
# Mixed batches drawn by (seed, epoch, batch, rank) on the device path, with a named input of another size: the
# resumed run must draw the same λ and box for the batches after the checkpoint.
CASES += [pytest.param("offline", ["distill=[kd]", "data.mixup_alpha=0.8", "data.cutmix_alpha=1.0",
                                   "data.device_resident=true", "+inputs.views.low={size:4}", "inputs.student=low"],
                       id="offline-mixed_device_batches")]
BATCHES_PER_EPOCH, EPOCHS, CHECKPOINT_EVERY = 4, 2, 3
RESUME_STEP = 3  # mid-epoch: one batch of epoch 0 is left, then all of epoch 1
QUICK = [f"trainer.max_epochs={EPOCHS}", f"trainer.limit_train_batches={BATCHES_PER_EPOCH}",
         "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "logger=none", "baseline=false",
         "callbacks=default", "callbacks.progress_bar=null", "callbacks.model_checkpoint=null",
         f"callbacks.last_checkpoint.every_n_train_steps={CHECKPOINT_EVERY}", "callbacks.last_checkpoint.save_top_k=-1"]


def compose_cfg(cache_dir: Path, output_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", f"paths.cache_dir={cache_dir}",
                                           f"paths.data_dir={cache_dir / 'data'}", *QUICK, *overrides])


class StageLosses(Callback):
    """The total loss of every training step of one stage (the run's last), by global step."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.by_step: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if Path(trainer.default_root_dir).name == self.stage:
            self.by_step[trainer.global_step] = outputs["loss"].item()


def run_recording(cfg, monkeypatch) -> dict[int, float]:
    recorder = StageLosses(plan_stages(cfg)[-1].name)
    original = pipeline.build_callbacks
    monkeypatch.setattr("kd_lightning.trainer_setup.build_callbacks", lambda cfg, has_logger: [*original(cfg, has_logger), recorder])
    run(cfg)
    monkeypatch.setattr("kd_lightning.trainer_setup.build_callbacks", original)
    return recorder.by_step


def resume_at_an_epoch_end(tmp_path: Path, monkeypatch, *settings: str) -> tuple[dict[int, float], dict[int, float]]:
    """(the losses after the first epoch of an uninterrupted run, those of a run resumed from the step
    checkpoint of that epoch's last batch); Lightning resumes from it without the epoch-end hooks."""
    settings = (*settings, f"callbacks.last_checkpoint.every_n_train_steps={BATCHES_PER_EPOCH}")
    whole = run_recording(compose_cfg(tmp_path / "cache", tmp_path / "whole", *settings), monkeypatch)
    checkpoint = tmp_path / "whole" / "student" / "checkpoints" / f"epoch=0-step={BATCHES_PER_EPOCH}.ckpt"
    resumed = run_recording(compose_cfg(tmp_path / "cache", tmp_path / "resumed", *settings,
                                        f"ckpt_path='{checkpoint}'"), monkeypatch)
    return {step: loss for step, loss in whole.items() if step > BATCHES_PER_EPOCH}, resumed


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # one teacher for the whole file


@pytest.mark.parametrize(("scheme", "overrides"), CASES)
def test_mid_epoch_resume_continues_with_the_uninterrupted_losses(scheme, overrides, cache_dir, tmp_path, monkeypatch):
    whole = run_recording(compose_cfg(cache_dir, tmp_path / "whole", f"scheme={scheme}", *overrides), monkeypatch)
    assert sorted(whole) == list(range(1, EPOCHS * BATCHES_PER_EPOCH + 1))
    last_stage = plan_stages(compose_cfg(cache_dir, tmp_path, f"scheme={scheme}", *overrides))[-1].name
    checkpoint = tmp_path / "whole" / last_stage / "checkpoints" / f"epoch=0-step={RESUME_STEP}.ckpt"
    assert checkpoint.is_file(), sorted(p.name for p in checkpoint.parent.iterdir())

    resumed = run_recording(compose_cfg(cache_dir, tmp_path / "resumed", f"scheme={scheme}", *overrides,
                                        f"ckpt_path='{checkpoint}'"), monkeypatch)

    after = {step: loss for step, loss in whole.items() if step > RESUME_STEP}
    assert resumed == after
    exports = sorted(path.name for path in (tmp_path / "whole").glob("*.pt"))  # one per trained network
    assert exports and exports == sorted(path.name for path in (tmp_path / "resumed").glob("*.pt"))
    for export in exports:
        final_whole, _ = read_weights(tmp_path / "whole" / export)
        final_resumed, _ = read_weights(tmp_path / "resumed" / export)
        assert all(torch.equal(final_whole[name], final_resumed[name]) for name in final_whole), export


def kd_train_command(tmp_path: Path, run_dir: str, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KD_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}
    command = [str(Path(sys.executable).with_name("kd-train")), f"hydra.run.dir={tmp_path / run_dir}", *args]
    return command, env


def step_losses(run_dir: Path) -> dict[int, float]:
    """`train/loss` of every logged student step, from the CSV logger's metrics.csv."""
    import csv

    (metrics,) = (run_dir / "csv" / "student").rglob("metrics.csv")
    with metrics.open() as handle:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row["train/loss"]}


# last.ckpt every 3 steps of 8-step epochs: every checkpoint but the final one (step 24) is mid-epoch, so the
# kill, however late it lands, leaves a mid-epoch last.ckpt.
KILL_RUN = ["scheme=supervised", "trainer.max_epochs=3", "trainer.limit_train_batches=8", "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
            "logger=csv", "callbacks=default", "callbacks.progress_bar=null", "callbacks.model_checkpoint=null",
            "callbacks.last_checkpoint.every_n_train_steps=3"]


@pytest.mark.slow  # three kd-train processes
def test_a_run_killed_mid_epoch_resumes_from_last_ckpt_with_the_uninterrupted_losses(tmp_path):
    command, env = kd_train_command(tmp_path, "killed", *KILL_RUN)
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "killed").rglob("last.ckpt")):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no last.ckpt within 300 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    (last,) = (tmp_path / "killed").rglob("last.ckpt")
    saved_step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert saved_step % 8 != 0, f"killed too late: last.ckpt is from step {saved_step}, an epoch's end"

    for run_dir, extra in (("resumed", [f"ckpt_path={last}"]), ("whole", [])):
        command, env = kd_train_command(tmp_path, run_dir, *KILL_RUN, *extra)
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    resumed, whole = step_losses(tmp_path / "resumed"), step_losses(tmp_path / "whole")
    assert min(resumed) == saved_step and len(resumed) >= 3
    assert resumed == {step: loss for step, loss in whole.items() if step >= saved_step}


def test_a_resumed_run_continues_its_wandb_run(cache_dir, tmp_path):
    wandb_run = ["scheme=supervised", "distill=[]", "logger=wandb", "logger.wandb.offline=true"]
    run(compose_cfg(cache_dir, tmp_path / "first", *wandb_run))
    checkpoint = tmp_path / "first" / "student" / "checkpoints" / f"epoch=0-step={RESUME_STEP}.ckpt"
    (checkpoint,) = (tmp_path / "first").rglob(checkpoint.name)
    run(compose_cfg(cache_dir, tmp_path / "second", *wandb_run, f"ckpt_path='{checkpoint}'"))

    (first,) = (tmp_path / "first" / "wandb").glob("offline-run-*")
    (second,) = (tmp_path / "second" / "wandb").glob("offline-run-*")
    run_id = first.name.rsplit("-", 1)[1]
    assert second.name.rsplit("-", 1)[1] == run_id
    assert (second / f"run-{run_id}.wandb").is_file()


def rank_loader(dataset, rank: int) -> ResumableLoader:
    return ResumableLoader(dataset, batch_size=2, sampler=EpochPermutationSampler(dataset, 2, rank, seed=7))


def test_each_ddp_rank_resumes_its_own_shard_mid_epoch_and_a_finished_epoch_moves_on():
    datamodule = SyntheticDataModule(train_size=20, val_size=4, test_size=4, batch_size=2)
    datamodule.setup()
    for rank in (0, 1):
        uninterrupted = rank_loader(datamodule.train_set, rank)
        uninterrupted.sampler.set_epoch(1)
        epoch = [batch[2].tolist() for batch in uninterrupted]
        interrupted = rank_loader(datamodule.train_set, rank)
        interrupted.sampler.set_epoch(1)
        for _, batch in zip(range(2), interrupted):
            pass
        resumed = rank_loader(datamodule.train_set, rank)
        resumed.load_state_dict(interrupted.state_dict())
        resumed.sampler.set_epoch(1)  # what Lightning calls before the resumed epoch's first batch
        assert [batch[2].tolist() for batch in resumed] == epoch[2:]
        # Saved after the epoch's last batch: Lightning starts the next epoch, which starts from its beginning.
        resumed.load_state_dict({"epoch": 1, "batches_delivered": len(epoch)})
        resumed.sampler.set_epoch(2)
        next_epoch = rank_loader(datamodule.train_set, rank)
        next_epoch.sampler.set_epoch(2)
        assert [b[2].tolist() for b in resumed] == [b[2].tolist() for b in next_epoch] != epoch
