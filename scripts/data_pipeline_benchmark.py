"""Epoch time of the training input pipeline: device-resident batches vs the DataLoader path, in one run.

    nice python scripts/data_pipeline_benchmark.py --datasets digits fashion_mnist cifar --workers 0 2

For each data set, one training epoch of batches is drawn (and, on a GPU, delivered to it) by
`data.device_resident=true` and by the DataLoader with each `--workers` count: after `--warmup` untimed
epochs, the median of `--epochs` timed ones. Each pipeline augments as its module's training transform does:
digits with one-pixel shifts (`augment=true`), Fashion-MNIST without augmentation, `cifar` (CIFAR-10 files
of random uint8 pixels, `--cifar-size` training images, written to a temporary directory) with pad-4 crops and
flips through PIL. `--threads` (default 1) fixes torch's intra-op threads, the same for every pipeline.
Prints one markdown row per (data set, pipeline): seconds per epoch, images/s, and the
ratio of its images/s to the first DataLoader row of the same data set. Only the pipeline is timed, no model.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from kd_lightning.data import CIFAR10DataModule, DigitsDataModule, FashionMNISTDataModule
from kd_lightning.data.base import KDDataModule


def write_cifar10(root: Path, train_size: int, seed: int = 0) -> None:
    """CIFAR-10's python layout with random pixels: five training batches, a small test batch, the meta file."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    sizes = [train_size // 5 + (1 if i < train_size % 5 else 0) for i in range(5)]
    for name, n in [*((f"data_batch_{i + 1}", n) for i, n in enumerate(sizes)), ("test_batch", 16)]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as handle:
            pickle.dump(entry, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, handle)


def data_modules(names: list[str], cifar_size: int, scratch: Path, batch_size: int | None
                 ) -> dict[str, Callable[..., KDDataModule]]:
    sizes = {} if batch_size is None else {"batch_size": batch_size}
    makers: dict[str, Callable[..., KDDataModule]] = {
        "digits": lambda **kw: DigitsDataModule(augment=True, val_fraction=0.0, **sizes, **kw),
        "fashion_mnist": lambda **kw: FashionMNISTDataModule(root=str(scratch / "data"), **sizes, **kw),
        "cifar": lambda **kw: CIFAR10DataModule(root=str(scratch / "cifar"), **sizes, **kw),
    }
    unknown = sorted(set(names) - set(makers))
    if unknown:
        raise SystemExit(f"unknown data sets {unknown}; choose from {sorted(makers)}")
    if "cifar" in names:
        write_cifar10(scratch / "cifar", cifar_size)
    return {name: makers[name] for name in names}


def epoch_seconds(loader: Any, device: torch.device, epoch: int) -> tuple[float, int]:
    loader.sampler.set_epoch(epoch)
    images = 0
    start = time.perf_counter()
    for batch in loader:
        inputs = batch[0].to(device, non_blocking=True)  # a no-op for device-resident batches
        images += len(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, images


def measure(make: Callable[..., KDDataModule], device: torch.device, workers: int | None, warmup: int,
            epochs: int) -> tuple[float, int]:
    """(median seconds per epoch, images per epoch); workers None: device-resident."""
    if workers is None:
        datamodule = make(device_resident=True)
        datamodule.setup("fit")
        split = datamodule.resident_train_split(device)
        loader: Any = datamodule.device_batches(split, pairs=False)
    else:
        datamodule = make(device_resident=False, num_workers=workers, pin_memory=device.type == "cuda")
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
    times = []
    for epoch in range(warmup + epochs):
        seconds, images = epoch_seconds(loader, device, epoch)
        if epoch >= warmup:
            times.append(seconds)
    return statistics.median(times), images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist", "cifar"])
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--cifar-size", type=int, default=10000, help="training images of the CIFAR-shaped set")
    parser.add_argument("--batch-size", type=int, default=None, help="default: each data config's")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs first (worker start-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of this process (on a shared machine more threads mostly wait)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| data | pipeline | s/epoch | images/s | ratio | images/epoch |\n| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as scratch:
        for name, make in data_modules(args.datasets, args.cifar_size, Path(scratch), args.batch_size).items():
            rows = {f"DataLoader, {w} workers": measure(make, device, w, args.warmup, args.epochs)
                    for w in args.workers}
            rows["device-resident"] = measure(make, device, None, args.warmup, args.epochs)
            first = next(iter(rows.values()))
            reference_rate = first[1] / first[0]
            for pipeline, (seconds, images) in rows.items():
                rate = images / seconds
                print(f"| {name} | {pipeline} | {seconds:.4f} | {rate:.0f} | {rate / reference_rate:.2f} | {images} |")


if __name__ == "__main__":
    main()
