"""Training throughput (images/s) of a distillation config, for several precisions in one process.

    python scripts/throughput.py --precisions 32-true bf16-mixed -- \
        data=synthetic teacher=resnet32x4 student=resnet8x4 distill=[kd] trainer=gpu data.batch_size=128

Everything after `--` is a Hydra override of conf/train.yaml. The teacher is randomly initialised (its
weights do not change the cost), the first `--warmup` steps are not timed, and the device is
synchronised around the timed window. Prints one markdown row per precision: images/s, the ratio to the
first precision, and how many images the timed window held.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kd_lightning.pipeline import build_model, build_terms, check_accelerator, scheme_kwargs
from kd_lightning.schemes import Offline
from kd_lightning.teachers import FrozenTeacher

CONF = Path(__file__).resolve().parents[1] / "conf"


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.start, self.elapsed = warmup, 0, 0.0, 0.0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._sync(module)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.images += len(batch[0])
        if batch_idx == trainer.num_training_batches - 1:
            self._sync(module)
            self.elapsed = time.perf_counter() - self.start


def measure(overrides: list[str], precision: str, steps: int, warmup: int) -> tuple[float, int]:
    """(images/s over the timed steps, images timed)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"trainer.precision={precision}", "paths.output_dir=/tmp"])
    check_accelerator(cfg.trainer)
    L.seed_everything(0)
    datamodule = instantiate(cfg.data)
    module = Offline(student=build_model(cfg.student, datamodule), teacher=FrozenTeacher(build_model(
        cfg.teacher.model, datamodule)), terms=build_terms(cfg), example_input=datamodule.example_input(),
        train_size=datamodule.train_size, train_targets=datamodule.train_targets, **scheme_kwargs(cfg, datamodule))
    timer = StepTimer(warmup)
    trainer = instantiate(cfg.trainer, max_epochs=1, limit_train_batches=steps + warmup, limit_val_batches=0,
                          logger=False, callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False,
                          num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    return timer.images / timer.elapsed, timer.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = parser.parse_args()
    rates = {precision: measure(args.overrides, precision, args.steps, args.warmup) for precision in args.precisions}
    first = rates[args.precisions[0]][0]
    print("| precision | images/s | ratio | images timed |\n| --- | --- | --- | --- |")
    for precision, (rate, images) in rates.items():
        print(f"| {precision} | {rate:.1f} | {rate / first:.3f} | {images} |")


if __name__ == "__main__":
    main()
