"""Training throughput (images/s) of the full distillation step, with the plain-loop floor, in one process.

    python scripts/throughput.py --batch-sizes 64 256 --precisions 32-true bf16-mixed \
        --resident false true --compile false true -- \
        data=synthetic data.train_size=8192 teacher=resnet32x4 student=resnet8x4 distill=[kd] trainer=gpu

Everything after `--` is a Hydra override of conf/train.yaml. For every batch size × precision it times the
Lightning fit of `Offline` (each `--resident` data.device_resident and `--compile` compile.student/teacher
setting, with the run's fast defaults: channels_last and cudnn.benchmark on CUDA) and the floor: the student's
SGD step and the teacher's forward on one fixed batch in a plain loop (CE + KD at T=4, no data, no Lightning).
The teacher is randomly initialised (its weights do not change the cost), the first `--warmup` steps are not
timed, and the device is synchronised around the timed window. Prints one markdown row per measurement:
images/s, the ratio to the floor of its batch size and precision, and how many images the timed window held.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kd_lightning.acceleration import accelerate, use_channels_last
from kd_lightning.pipeline import build_model, build_terms, check_accelerator, scheme_kwargs
from kd_lightning.stage_build import configure_inputs
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
            self.images += len(batch[1])  # the targets: the inputs may be a dict of named inputs
        if batch_idx == trainer.num_training_batches - 1:
            self._sync(module)
            self.elapsed = time.perf_counter() - self.start


def compose_cfg(overrides: list[str], precision: str, batch_size: int, resident: bool, compiled: bool):
    switches = [f"trainer.precision={precision}", f"data.batch_size={batch_size}", f"data.device_resident={resident}",
                f"compile.student={compiled}", f"compile.teacher={compiled}", "paths.output_dir=/tmp"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *switches])
    check_accelerator(cfg.trainer)
    return cfg


def measure(cfg, steps: int, warmup: int) -> tuple[float, int]:
    """(images/s over the timed steps of the Lightning fit, images timed)."""
    L.seed_everything(0)
    datamodule = instantiate(cfg.data)
    configure_inputs(cfg, datamodule)  # named inputs (inputs.*), when the overrides set any
    module = Offline(student=build_model(cfg.student, datamodule), teacher=FrozenTeacher(build_model(
        cfg.teacher.model, datamodule)), terms=build_terms(cfg), example_input=datamodule.example_input(),
        train_size=datamodule.train_size, train_targets=datamodule.train_targets, **scheme_kwargs(cfg, datamodule))
    timer = StepTimer(warmup)
    trainer = instantiate(cfg.trainer, max_epochs=1, limit_train_batches=steps + warmup, limit_val_batches=0,
                          logger=False, callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False,
                          num_sanity_val_steps=0)
    accelerate(module, trainer.strategy.root_device, cfg)
    trainer.fit(module, datamodule=datamodule)
    return timer.images / timer.elapsed, timer.images


def floor(cfg, steps: int, warmup: int) -> tuple[float, int]:
    """(images/s, images timed) of the bare step: teacher forward, student forward/backward, SGD, one batch."""
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    device = torch.device("cuda" if str(cfg.trainer.accelerator) in ("gpu", "cuda") else "cpu")
    student = build_model(cfg.student, datamodule).to(device).train()
    teacher = build_model(cfg.teacher.model, datamodule).to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        use_channels_last(student), use_channels_last(teacher)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    batch = int(cfg.data.batch_size)
    images = torch.randn(batch, *datamodule.input_shape, device=device)
    targets = torch.randint(datamodule.num_classes, (batch,), device=device)
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                teacher_logits = teacher(images)
            logits = student(images)
        temperature = 4.0
        loss = F.cross_entropy(logits.float(), targets) + F.kl_div(
            F.log_softmax(logits.float() / temperature, 1), F.softmax(teacher_logits.float() / temperature, 1),
            reduction="batchmean") * temperature ** 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * batch / (time.perf_counter() - start), steps * batch


def flag(text: str) -> bool:
    return {"true": True, "false": False}[text.lower()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--resident", nargs="+", type=flag, default=[False, True], help="data.device_resident")
    parser.add_argument("--compile", nargs="+", type=flag, default=[False, True], help="compile.student/teacher")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation included)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = parser.parse_args()
    print("| batch | precision | step | images/s | ratio to floor | images timed |\n| --- | --- | --- | --- | --- | --- |")
    for batch_size in args.batch_sizes:
        for precision in args.precisions:
            base = compose_cfg(args.overrides, precision, batch_size, False, False)
            floor_rate, floor_images = floor(base, args.steps, args.warmup)
            print(f"| {batch_size} | {precision} | floor (plain loop) | {floor_rate:.1f} | 1.000 | {floor_images} |")
            for resident in args.resident:
                for compiled in args.compile:
                    cfg = compose_cfg(args.overrides, precision, batch_size, resident, compiled)
                    rate, images = measure(cfg, args.steps, args.warmup)
                    step = f"fit, resident={str(resident).lower()}, compile={str(compiled).lower()}"
                    print(f"| {batch_size} | {precision} | {step} | {rate:.1f} | {rate / floor_rate:.3f} | {images} |")


if __name__ == "__main__":
    main()
