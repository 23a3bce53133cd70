"""What the exact teacher-output cache saves (kd_lightning/teacher_cache.py), measured in one process.

    nice python scripts/teacher_cache_benchmark.py epoch --teacher resnet20 --student resnet8 --train-size 640 --epochs 9
    nice python scripts/teacher_cache_benchmark.py sweep --seeds 0 1 2 --epochs 10 [-- <Hydra overrides>]

`epoch`: CIFAR-shaped synthetic uint8 images (3×32×32, 100 classes) with CIFAR's pad-4 crop + flip (162 views),
the teacher randomly initialised (its weights do not change the cost). Times training epochs of the student
alone (supervised), of KD with every (sample, view) of the cache precomputed, and of KD without the cache.
The arms are interleaved: each of `--epochs` rounds (after one untimed round, which also precomputes the
cache) trains one epoch of every arm, in an order that rotates per round, so a change in the load of a
shared machine reaches all arms alike; each arm's ratio to the student-only epoch of the same round is one
sample. Prints two tables, one per clock, with one row per arm: median seconds per epoch, median ratio, and
the ratios' range. CPU time (the process's, all in one thread: `--threads 1`, no loader workers) counts
the work an epoch does and is barely moved by other processes on a shared machine; wall time is what a
user waits, and on a loaded machine mostly measures the load.
`sweep`: the default digits job with its one-pixel-shift augmentation (9 views), `--seeds` jobs in a row,
without the cache, with a lazily filled shared file (teacher_cache=mmap), and with it precomputed by the first
job; the teacher stage is trained once before the timing and read from the stage cache by every job. Prints
each arm's total wall time and its ratio to the uncached sweep.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from kd_lightning.data.base import KDDataModule, TensorImageDataset
from kd_lightning.data.views import CropFlipViews, ViewedTransform
from kd_lightning.losses.terms import KD
from kd_lightning.models import build_model
from kd_lightning.pipeline import run
from kd_lightning.schemes import Offline, Supervised
from kd_lightning.teacher_cache import TeacherCacheOptions

CONF = Path(__file__).resolve().parents[1] / "conf"
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class CifarShaped(KDDataModule):
    """Random uint8 CIFAR-shaped images with the CIFAR training augmentation (named views)."""

    def __init__(self, train_size: int, batch_size: int, num_classes: int = 100) -> None:
        super().__init__(batch_size)
        self.num_classes, self.in_channels, self.image_size = num_classes, 3, (32, 32)
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (train_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
        self.targets = torch.randint(0, num_classes, (train_size,), generator=generator)

    @property
    def train_views(self) -> CropFlipViews:
        return CropFlipViews(pad=4, flip=True, fill=0.0)

    def load_train_pool(self) -> TensorImageDataset:
        return TensorImageDataset(self.images, self.targets)  # uint8 → [0, 1]; normalised after the view

    def load_test(self) -> TensorImageDataset:
        return TensorImageDataset(self.images[:8], self.targets[:8])

    def train_transform(self) -> ViewedTransform:
        mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
        return ViewedTransform(self.train_views, after=lambda image: (image - mean) / std)


CLOCKS = {"CPU": time.process_time, "wall": time.perf_counter}


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.durations: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.start = {name: clock() for name, clock in CLOCKS.items()}

    def on_train_epoch_end(self, trainer, module) -> None:
        self.durations.append({name: clock() - self.start[name] for name, clock in CLOCKS.items()})


def time_epoch(module: L.LightningModule, data: KDDataModule) -> dict[str, float]:
    """One training epoch of `module` (a new Trainer, the module's weights carried on): seconds by clock."""
    timer = EpochTimer()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, callbacks=[timer],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return timer.durations[0]


STUDENT_ONLY = "student only (supervised)"


def epoch_benchmark(args: argparse.Namespace) -> None:
    data = CifarShaped(args.train_size, args.batch_size)
    optimizer = lambda parameters: torch.optim.SGD(parameters, lr=0.05, momentum=0.9)  # noqa: E731
    with tempfile.TemporaryDirectory() as directory:
        def module(cache: TeacherCacheOptions | None | bool) -> L.LightningModule:
            torch.manual_seed(0)
            student = build_model(args.student, num_classes=100, in_channels=3)
            if cache is False:
                return Supervised(student, num_classes=100, optimizer=optimizer)
            return Offline(student=student, teacher=build_model(args.teacher, num_classes=100, in_channels=3),
                           terms={"kd": KD()}, num_classes=100, example_input=data.example_input(),
                           train_size=args.train_size, teacher_cache=cache, optimizer=optimizer)

        warm = TeacherCacheOptions(storage="memory", directory=Path(directory), precompute=True)
        arms = {STUDENT_ONLY: module(False), "KD, cache warm (all 162 views precomputed)": module(warm),
                "KD, no cache": module(None)}
        names = list(arms)
        seconds: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for round_ in range(args.epochs + 1):
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                seconds[name].append(time_epoch(arms[name], data))
    print(f"{args.teacher} → {args.student}, {args.train_size} images/epoch, batch {args.batch_size}, "
          f"{args.epochs} interleaved rounds, {torch.get_num_threads()} threads")
    for clock in CLOCKS:
        timed = {name: [epoch[clock] for epoch in values[1:]] for name, values in seconds.items()}  # round 0: warm-up
        ratios = {name: [value / base for value, base in zip(values, timed[STUDENT_ONLY])]
                  for name, values in timed.items()}
        print(f"\n| arm ({clock} time) | s / epoch (median) | ratio to student only (median) | ratio range |\n"
              f"| --- | --- | --- | --- |")
        for name in names:
            print(f"| {name} | {statistics.median(timed[name]):.3f} | {statistics.median(ratios[name]):.3f} | "
                  f"{min(ratios[name]):.3f}–{max(ratios[name]):.3f} |")


def print_ratios(arm: str, unit: str, ratio: str, seconds: dict[str, float], base: float, digits: int) -> None:
    print(f"| {arm} | {unit} | {ratio} |\n| --- | --- | --- |")
    for name, value in seconds.items():
        print(f"| {name} | {value:.{digits}f} | {value / base:.3f} |")


def sweep_benchmark(args: argparse.Namespace) -> None:
    arms = {"no cache": (), "teacher_cache=mmap (lazy)": ("teacher_cache=mmap",),
            "teacher_cache=mmap, precomputed by job 1": ("teacher_cache=mmap", "teacher_cache.precompute=true")}
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)

        def job(seed: int, cache_dir: Path, *overrides: str) -> None:
            with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
                cfg = compose("train", overrides=[
                    f"paths.output_dir={root / 'out'}", f"paths.cache_dir={cache_dir}", "logger=none",
                    "callbacks=none", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                    "data.augment=true", "baseline=false", f"trainer.max_epochs={args.epochs}",
                    f"teacher.max_epochs={args.teacher_epochs}", f"seed={seed}", *args.overrides, *overrides])
            run(cfg)

        job(args.seeds[0], root / "warmup", "trainer.max_epochs=1")  # trains and caches the teacher stage, untimed
        cache_dirs = {name: root / f"arm{index}" for index, name in enumerate(arms)}
        for cache_dir in cache_dirs.values():  # every arm reads that teacher; each fills its own output file
            cache_dir.mkdir()
            (cache_dir / "stages").symlink_to(root / "warmup" / "stages")
        totals = dict.fromkeys(arms, 0.0)
        for seed in args.seeds:  # arms interleaved per seed, so a change in the machine's load hits all of them
            for name, overrides in arms.items():
                start = time.perf_counter()
                job(seed, cache_dirs[name], *overrides)
                totals[name] += time.perf_counter() - start
    base = totals["no cache"]
    print(f"digits + one-pixel shifts (9 views), {len(args.seeds)} seeds × {args.epochs} student epochs, teacher "
          f"trained beforehand, arms interleaved per seed")
    print_ratios("sweep", "total s", "ratio to no cache", totals, base, digits=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: no spinning on a shared CPU)")
    commands = parser.add_subparsers(dest="command", required=True)
    epoch = commands.add_parser("epoch", help="epoch time: warm cache vs student only")
    epoch.add_argument("--teacher", default="resnet20")
    epoch.add_argument("--student", default="resnet8")
    epoch.add_argument("--train-size", type=int, default=128)
    epoch.add_argument("--batch-size", type=int, default=64)
    epoch.add_argument("--epochs", type=int, default=5, help="timed rounds, one epoch per arm (after one untimed)")
    sweep = commands.add_parser("sweep", help="a seed sweep's wall time with and without the cache")
    sweep.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sweep.add_argument("--epochs", type=int, default=10, help="student epochs per job")
    sweep.add_argument("--teacher-epochs", type=int, default=30)
    sweep.add_argument("overrides", nargs="*", help="Hydra overrides of every job, after --")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    epoch_benchmark(args) if args.command == "epoch" else sweep_benchmark(args)


if __name__ == "__main__":
    main()
