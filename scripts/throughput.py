"""Training throughput (images/s) of the full distillation step, with the plain-loop floor, in one process.

    python scripts/throughput.py --batch-sizes 64 256 --precisions 32-true bf16-mixed \
        --resident false true --compile false true -- \
        data=synthetic data.train_size=8192 teacher=resnet32x4 student=resnet8x4 distill=[kd] trainer=gpu

Everything after `--` is a Hydra override of conf/train.yaml. For every batch size × precision it times the
Lightning fit of `Offline` (each `--resident` data.device_resident and `--compile` compile.student/teacher
setting, with the run's fast defaults: channels_last and cudnn.benchmark on CUDA) and the floor: the teacher's
forward and the student's step with the run's optimizer in a plain loop over one fixed batch (CE + KD at T=4, no
data, no Lightning), sliced to the fit's batch sizes (each epoch's last batch is partial); and between them the same
plain step in a bare LightningModule on the same batches (Lightning's own cost per step). The fit's timed window
runs across epochs when an epoch holds fewer batches than `--warmup` + `--steps` (digits: 21 batches of 64).
The teacher is randomly initialised (its weights do not change the cost), the first `--warmup` steps are not
timed, and the device is synchronised around the timed window.

Prints one markdown row per setting: images/s and its ratio to the floor of its batch size and precision (with
`--rounds R`, every row is measured R times, the loops alternating, and the ratio is the median of the rounds'
ratios, with their range), then the median full-size step split into its time inside the networks (forward hooks
and around backward: the same work in every loop) and the rest, and the step cost × floor: (the floor's network
ms + the row's ms outside) ÷ (the floor's network ms + its ms outside), each loop's own overhead priced against the
same network work. On a shared or virtual CPU a slow spell stretches whole windows, so window ratios drift, while
it stretches a step's two parts alike and the step cost repeats. On CUDA (asynchronous) and for compiled networks
(the clock's hooks would break their graphs, so they get none) only the window ratio is meaningful. `--clock cpu`
times by this process's CPU time instead of the wall clock, for a machine other jobs share.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kd_lightning.acceleration import accelerate, use_channels_last
from kd_lightning.data.inputs import batch_size_of
from kd_lightning.pipeline import build_model, build_terms, check_accelerator, scheme_kwargs
from kd_lightning.stage_build import configure_inputs
from kd_lightning.schemes import Offline
from kd_lightning.teachers import FrozenTeacher

CONF = Path(__file__).resolve().parents[1] / "conf"
# `--clock cpu` times with the process's CPU time: on a CPU shared with other jobs, wall time mostly measures
# how long the scheduler made this process wait, CPU time the work done. CUDA runs need wall time (the host waits
# for the device without working).
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = [time.perf_counter]


class ModelClock:
    """Seconds spent inside the networks' forwards (pre/post forward hooks on each) and in backward: the work a
    plain loop and the fit share. On CPU a step's remaining time is its overhead (loop, data, loss bookkeeping,
    optimizer); a slow spell of the machine stretches both parts alike, so their ratio is steadier than either."""

    def __init__(self, *networks: torch.nn.Module) -> None:
        self.seconds, self._entered = 0.0, 0.0
        for network in networks:
            network.register_forward_pre_hook(self._enter)
            network.register_forward_hook(self._leave)

    def _enter(self, *_: object) -> None:
        self._entered = CLOCK[0]()

    def _leave(self, *_: object) -> None:
        self.seconds += CLOCK[0]() - self._entered

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


class StepTimer(L.Callback):
    """Times training batches `warmup` .. `warmup + steps - 1`, counted across epochs: a small data set (digits:
    21 batches of 64, 6 of 256) holds fewer batches per epoch than the window, so its epoch boundaries (a new
    loader iterator, epoch-end hooks, the scheduler step) fall inside it, as they do in training. It also keeps
    each timed step's duration, batch start to the next batch's start (hooks, loop and the next batch's fetch
    included), its batch size and its time in the networks (`ModelClock`)."""

    def __init__(self, warmup: int, steps: int, clock: ModelClock) -> None:
        self.warmup, self.steps, self.seen, self.images, self.start, self.elapsed = warmup, steps, 0, 0, 0.0, 0.0
        self.clock, self.step_times = clock, []
        self._step_start, self._step_size, self._backward_start = 0.0, 0, 0.0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self.seen == self.warmup:
            self._sync(module)
            self.start = CLOCK[0]()
        now, network_seconds = CLOCK[0](), self.clock.take()
        if self.warmup < self.seen <= self.warmup + self.steps:
            self.step_times.append((now - self._step_start, self._step_size, network_seconds))
        self._step_start, self._step_size = now, batch_size_of(batch[0])

    def on_before_backward(self, trainer, module, loss) -> None:
        self._backward_start = CLOCK[0]()

    def on_after_backward(self, trainer, module) -> None:
        self.clock.seconds += CLOCK[0]() - self._backward_start

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen > self.warmup:
            self.images += batch_size_of(batch[0])
        if self.seen == self.warmup + self.steps:
            self._sync(module)
            now = CLOCK[0]()
            self.elapsed = now - self.start
            self.step_times.append((now - self._step_start, self._step_size, self.clock.take()))


def compose_cfg(overrides: list[str], precision: str, batch_size: int, resident: bool, compiled: bool):
    switches = [f"trainer.precision={precision}", f"data.batch_size={batch_size}", f"data.device_resident={resident}",
                f"compile.student={compiled}", f"compile.teacher={compiled}", "paths.output_dir=/tmp"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, *switches])
    check_accelerator(cfg.trainer)
    return cfg


def measure(cfg, steps: int, warmup: int) -> tuple[float, int, list[tuple[float, int, float]]]:
    """(images/s over the timed steps of the Lightning fit, images timed, (duration, batch size, seconds in the
    networks) of each step)."""
    L.seed_everything(0)
    datamodule = instantiate(cfg.data)
    configure_inputs(cfg, datamodule)  # named inputs (inputs.*), when the overrides set any
    student, teacher = build_model(cfg.student, datamodule), build_model(cfg.teacher.model, datamodule)
    module = Offline(student=student, teacher=FrozenTeacher(teacher), terms=build_terms(cfg),
                     example_input=datamodule.example_input(), train_size=datamodule.train_size,
                     train_targets=datamodule.train_targets, **scheme_kwargs(cfg, datamodule))
    # Compiled networks get no clock: hooks timing them would break their graphs.
    compiled = bool(cfg.compile.student or cfg.compile.teacher)
    timer = StepTimer(warmup, steps, ModelClock(*(() if compiled else (student, teacher))))
    trainer = instantiate(cfg.trainer, max_epochs=-1, max_steps=steps + warmup, limit_val_batches=0,
                          logger=False, callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False,
                          num_sanity_val_steps=0)
    accelerate(module, trainer.strategy.root_device, cfg)
    trainer.fit(module, datamodule=datamodule)
    return timer.images / timer.elapsed, timer.images, timer.step_times


def epoch_batch_sizes(train_size: int, batch: int) -> list[int]:
    """The batch sizes of one training epoch (the last one partial, as the DataLoader delivers it)."""
    return [batch] * (train_size // batch) + ([train_size % batch] if train_size % batch else [])


def plain_networks(cfg):
    """Fresh networks of the run's architectures on its device, the run's optimizer, the fit's batch sizes and one
    fixed random batch: what the plain loop and the bare Lightning module step on."""
    torch.manual_seed(0)
    datamodule = instantiate(cfg.data)
    device = torch.device("cuda" if str(cfg.trainer.accelerator) in ("gpu", "cuda") else "cpu")
    student = build_model(cfg.student, datamodule).to(device).train()
    teacher = build_model(cfg.teacher.model, datamodule).to(device).eval().requires_grad_(False)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        use_channels_last(student), use_channels_last(teacher)
    # The fit's optimizer (SGD by default, AdamW under experiment=vit_digits): its step is part of every loop.
    optimizer = instantiate(cfg.optimizer)(student.parameters())
    batch = int(cfg.data.batch_size)
    sizes = epoch_batch_sizes(int(datamodule.train_size), batch)
    images = torch.randn(batch, *datamodule.input_shape, device=device)
    targets = torch.randint(datamodule.num_classes, (batch,), device=device)
    return student, teacher, optimizer, sizes, images, targets


def plain_kd_loss(student, teacher, images: torch.Tensor, targets: torch.Tensor, bf16: bool) -> torch.Tensor:
    """CE + KD at T=4, the step's loss in both reference loops."""
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            teacher_logits = teacher(images)
        logits = student(images)
    temperature = 4.0
    return F.cross_entropy(logits.float(), targets) + F.kl_div(
        F.log_softmax(logits.float() / temperature, 1), F.softmax(teacher_logits.float() / temperature, 1),
        reduction="batchmean") * temperature ** 2


def floor(cfg, steps: int, warmup: int) -> tuple[float, int, list[tuple[float, int, float]]]:
    """(images/s, images timed, (duration, batch size, seconds in the networks) of each step) of the bare step:
    teacher forward, student forward/backward and the run's optimizer step, on slices of one fixed batch sized as
    the fit's batches are (an epoch's last batch is partial)."""
    student, teacher, optimizer, sizes, images, targets = plain_networks(cfg)
    clock, bf16 = ModelClock(student, teacher), str(cfg.trainer.precision).startswith("bf16")
    start, timed, step_times = 0.0, 0, []
    for step in range(warmup + steps):
        if step == warmup:
            if images.device.type == "cuda":
                torch.cuda.synchronize(images.device)
            start = CLOCK[0]()
        step_start = CLOCK[0]()
        clock.take()
        size = sizes[step % len(sizes)]
        timed += size if step >= warmup else 0
        loss = plain_kd_loss(student, teacher, images[:size], targets[:size], bf16)
        optimizer.zero_grad(set_to_none=True)
        backward_start = CLOCK[0]()
        loss.backward()
        clock.seconds += CLOCK[0]() - backward_start
        optimizer.step()
        if step >= warmup:
            step_times.append((CLOCK[0]() - step_start, size, clock.take()))
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    return timed / (CLOCK[0]() - start), timed, step_times


class BareModule(L.LightningModule):
    """The plain loop's step as a LightningModule: what Lightning's own loop adds per step, without this
    framework (no terms, taps, loss bookkeeping or data module)."""

    def __init__(self, student, teacher, optimizer, bf16: bool) -> None:
        super().__init__()
        self.student, self.teacher, self.optimizer, self.bf16 = student, FrozenTeacher(teacher), optimizer, bf16

    def training_step(self, batch, batch_idx):
        return plain_kd_loss(self.student, self.teacher, *batch, self.bf16)

    def configure_optimizers(self):
        return self.optimizer


class FixedBatches:
    """One epoch of batches sliced from one fixed batch, sized as the fit's: the plain loop's data, as a loader."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, sizes: list[int]) -> None:
        self.images, self.targets, self.sizes = images, targets, sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self):
        return ((self.images[:size], self.targets[:size]) for size in self.sizes)


def bare_lightning(cfg, steps: int, warmup: int) -> tuple[float, int, list[tuple[float, int, float]]]:
    """As `measure`, for the plain loop's step in a bare LightningModule on the plain loop's batches."""
    student, teacher, optimizer, sizes, images, targets = plain_networks(cfg)
    timer = StepTimer(warmup, steps, ModelClock(student, teacher))
    trainer = instantiate(cfg.trainer, max_epochs=-1, max_steps=steps + warmup, limit_val_batches=0,
                          logger=False, callbacks=[timer], enable_checkpointing=False, enable_progress_bar=False,
                          num_sanity_val_steps=0)
    module = BareModule(student, teacher, optimizer, str(cfg.trainer.precision).startswith("bf16"))
    trainer.fit(module, train_dataloaders=FixedBatches(images, targets, sizes))
    return timer.images / timer.elapsed, timer.images, timer.step_times


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
    parser.add_argument("--rounds", type=int, default=1,
                        help="times every row is measured; the floor and the fits alternate round by round, so slow "
                        "spells of a shared machine fall on both, and each row reports its median and range")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (a CPU run on a machine shared with "
                        "other jobs)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = parser.parse_args()
    CLOCK[0] = CLOCKS[args.clock]
    print("| batch | precision | step | images/s | ratio to floor | ratio range | median step ms | ms in the networks "
          "| ms outside | step cost × floor | images timed |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- "
          "| --- | --- |")
    for batch_size in args.batch_sizes:
        for precision in args.precisions:
            plain = compose_cfg(args.overrides, precision, batch_size, False, False)
            settings = {"floor (plain loop)": plain, "Lightning, bare module": plain}
            for resident in args.resident:
                for compiled in args.compile:
                    settings[f"fit, resident={str(resident).lower()}, compile={str(compiled).lower()}"] = compose_cfg(
                        args.overrides, precision, batch_size, resident, compiled)
            rates: dict[str, list[float]] = {step: [] for step in settings}
            # (duration, seconds in the networks) of every full-size step, over all rounds
            full_steps: dict[str, list[tuple[float, float]]] = {step: [] for step in settings}
            images: dict[str, int] = {}
            for round_ in range(args.rounds):
                # Every other round runs the settings in reverse, so no setting always follows the same one.
                order = list(settings) if round_ % 2 == 0 else list(reversed(settings))
                for step in order:
                    run = {"floor (plain loop)": floor, "Lightning, bare module": bare_lightning}.get(step, measure)
                    rate, images[step], step_times = run(settings[step], args.steps, args.warmup)
                    rates[step].append(rate)
                    full_steps[step] += [(seconds, model) for seconds, size, model in step_times if size == batch_size]
            floor_rates = next(iter(rates.values()))
            floor_model, floor_outside = step_parts(next(iter(full_steps.values())))
            for step, step_rates in rates.items():
                ratios = [rate / base for rate, base in zip(step_rates, floor_rates)]
                model, outside = step_parts(full_steps[step])
                step_ms = median_or_nan([seconds for seconds, _ in full_steps[step]])
                # The networks' work is the same in both loops: the cost is the floor's network time plus each
                # loop's own time outside the networks.
                parts = (f"{1000 * model:.2f} | {1000 * outside:.2f} | "
                         f"{(floor_model + outside) / (floor_model + floor_outside):.3f}" if model else "– | – | –")
                print(f"| {batch_size} | {precision} | {step} | {statistics.median(step_rates):.1f} | "
                      f"{statistics.median(ratios):.3f} | {min(ratios):.3f}–{max(ratios):.3f} | "
                      f"{1000 * step_ms:.2f} | {parts} | {images[step]} |", flush=True)


def step_parts(steps: list[tuple[float, float]]) -> tuple[float, float]:
    """Median seconds in the networks and median seconds outside them, over full-size steps."""
    return median_or_nan([model for _, model in steps]), median_or_nan([seconds - model for seconds, model in steps])


def median_or_nan(values: list[float]) -> float:
    """The median step time; NaN where no step had the full batch size (a data set smaller than one batch)."""
    return statistics.median(values) if values else float("nan")


if __name__ == "__main__":
    main()
