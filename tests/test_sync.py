"""No host-device synchronisation in a training step, except at logging steps.

On a GPU every `.item()`, `bool(tensor)`, `torch.unique` or copy to the host waits for the queued kernels,
which starves the device. Lightning converts logged values only at logging steps (`log_every_n_steps`),
so the code may wait there and nowhere else. The check needs no GPU: it counts the Tensor methods and
torch functions that synchronise on CUDA, through a real `Trainer.fit` built by the pipeline with the
default callbacks (RichProgressBar included) and the CSV logger. Syncs inside C++ ops (boolean-mask
indexing, for one) are invisible to it; `torch.cuda.set_sync_debug_mode("error")` would see those on a GPU.
"""

from __future__ import annotations

import functools
import traceback
import weakref

import lightning as L
import pytest
import torch

from kd_lightning import pipeline
from kd_lightning.schemes import Offline
from kd_lightning.stages import plan_stages

# Each returns a host value computed from device data (or waits for it), so on CUDA each one waits.
SYNCING_TENSOR_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
                          "cpu", "numpy", "masked_select", "equal", "allclose")
SYNCING_TORCH_FUNCTIONS = ("unique", "nonzero", "masked_select", "equal", "allclose", "is_nonzero")
# What these make of a host tensor stays on the host.
HOST_PRESERVING_METHODS = ("clone", "detach", "squeeze", "to", "float", "view", "reshape")

BATCHES, LOG_EVERY = 10, 4


def caller() -> str:
    """The innermost frame outside torch and this file: the code that asked for the host value."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"


class SyncCounter(L.Callback):
    """Counts synchronising calls per training batch, from `on_train_batch_start` (the first callback's)
    to the end of the loop's `advance` (after the progress bar and the loggers have run).

    On a CPU-only machine every tensor is a host tensor, so the counter keeps track of which ones would be
    host memory on an accelerator: the results of a (counted) `cpu()`, and what `clone`/`detach`/`to`/...
    make of them. Reading those later (Lightning re-reads a cached progress-bar value every batch) is free.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: dict[int, list[str]] = {}
        self._batch: int | None = None
        self._host: dict[int, weakref.ref] = {}  # by id: a WeakSet would compare tensors with ==
        for owner, names in ((torch.Tensor, SYNCING_TENSOR_METHODS), (torch, SYNCING_TORCH_FUNCTIONS)):
            for name in names:
                monkeypatch.setattr(owner, name, self._counted(getattr(owner, name), name))
        for name in HOST_PRESERVING_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._host_preserving(getattr(torch.Tensor, name)))

    def _counted(self, original, name: str):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            on_host = bool(args) and self._on_host(args[0])
            if self._batch is None or on_host:
                result = original(*args, **kwargs)
            else:
                batch, self._batch = self._batch, None  # calls made inside this call are not counted twice
                self.calls[batch].append(f"{name} at {caller()}")
                try:
                    result = original(*args, **kwargs)
                finally:
                    self._batch = batch
            if name == "cpu":
                self._mark_host(result)
            return result

        return wrapper

    def _on_host(self, tensor) -> bool:
        entry = self._host.get(id(tensor))
        return entry is not None and entry() is tensor

    def _mark_host(self, tensor: torch.Tensor) -> None:
        self._host[id(tensor)] = weakref.ref(tensor)

    def _host_preserving(self, original):
        @functools.wraps(original)
        def wrapper(tensor, *args, **kwargs):
            result = original(tensor, *args, **kwargs)
            if isinstance(result, torch.Tensor) and self._on_host(tensor):
                self._mark_host(result)
            return result

        return wrapper

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop.epoch_loop
        advance = loop.advance

        def counted_advance(*args, **kwargs):
            try:
                return advance(*args, **kwargs)
            finally:
                self._batch = None

        loop.advance = counted_advance

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.calls[batch_idx] = []
        self._batch = batch_idx


def count_syncs(make_cfg, monkeypatch, distill: str) -> dict[int, list[str]]:
    cfg = make_cfg(f"distill=[{distill}]", "data=synthetic", "data.num_classes=10", "data.train_size=640",
                   "data.batch_size=32", "student=convnet_tiny", "teacher=convnet_large", "data.image_size=8", "callbacks=default",
                   "logger=csv", "trainer.enable_progress_bar=true", f"trainer.limit_train_batches={BATCHES}",
                   f"trainer.log_every_n_steps={LOG_EVERY}", "trainer.limit_val_batches=1", "baseline=false",
                   *(["distill.crd.nce_k=256"] if distill == "crd" else []), fast=False)
    counter = SyncCounter(monkeypatch)
    real_callbacks = pipeline.build_callbacks
    monkeypatch.setattr("kd_lightning.trainer_setup.build_callbacks", lambda *args: [counter, *real_callbacks(*args)])
    datamodule = pipeline.construct(cfg.data)
    teacher = pipeline.build_model(cfg.teacher.model, datamodule)
    student_stage = plan_stages(cfg)[-1]
    module = pipeline.build_stage_module(pipeline.stage_config(cfg, student_stage), student_stage, datamodule,
                                         {"teacher": teacher})
    assert isinstance(module, Offline)
    pipeline.fit_and_test(cfg, module, datamodule, "student", max_epochs=1, test=False)
    assert sorted(counter.calls) == list(range(BATCHES))
    return counter.calls


@pytest.mark.parametrize("distill", ["kd", "crd"])
def test_no_host_sync_in_training_steps_outside_logging_steps(make_cfg, monkeypatch, distill):
    calls = count_syncs(make_cfg, monkeypatch, distill)
    logging = [batch for batch in range(BATCHES) if (batch + 1) % LOG_EVERY == 0]
    quiet = [batch for batch in range(BATCHES - 1) if batch not in logging]  # the epoch's last batch may check
    unexpected = {batch: calls[batch] for batch in quiet if calls[batch]}
    assert not unexpected, "\n".join(f"batch {batch}: {call}" for batch, batch_calls in unexpected.items() for call in batch_calls)
    # The counter does see the conversions Lightning makes when it writes the loggers.
    assert all(calls[batch] for batch in logging), calls
