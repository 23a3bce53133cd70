"""scripts/teacher_cache_benchmark.py runs both measurements on a tiny setting and prints consistent ratios."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*arguments: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "teacher_cache_benchmark.py"), *arguments],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def rows(output: str) -> list[tuple[str, float, float]]:
    found = re.findall(r"^\| ([^|]+) \| ([\d.]+) \| ([\d.]+) \|$", output, flags=re.MULTILINE)
    return [(name.strip(), float(value), float(ratio)) for name, value, ratio in found]


def check_ratios(rows: list[tuple[str, float, float]], names: list[str], digits: int) -> None:
    assert [name for name, *_ in rows] == names
    base = rows[0][1]
    assert rows[0][2] == 1.0
    rounding = 0.5 * 10 ** -digits  # of each printed time
    for _, value, ratio in rows:  # each ratio is its arm over the first, up to the rounding of the printed numbers
        assert abs(ratio - value / base) <= rounding / base * (1 + value / base) + 0.5e-3


def test_epoch_and_sweep_measurements_print_their_ratios():
    epoch = run_script("epoch", "--teacher", "convnet_small", "--student", "convnet_tiny", "--train-size", "32",
                       "--batch-size", "16", "--epochs", "3")
    # Interleaved rounds: per arm the median epoch, the median of its per-round ratios, and their range.
    found = re.findall(r"^\| ([^|]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)–([\d.]+) \|$", epoch, flags=re.MULTILINE)
    arms = ["student only (supervised)", "KD, cache warm (all 162 views precomputed)", "KD, no cache"]
    assert [name.strip() for name, *_ in found] == arms * 2  # one table by CPU time, one by wall time
    assert "| arm (CPU time) |" in epoch and "| arm (wall time) |" in epoch
    assert [float(value) for value in found[0][2:]] == [1.0, 1.0, 1.0] == [float(value) for value in found[3][2:]]
    for _, seconds, median, low, high in found:
        assert float(seconds) > 0 and float(low) <= float(median) <= float(high)
    assert "3 interleaved rounds" in epoch
    sweep = run_script("sweep", "--seeds", "0", "--epochs", "1", "--teacher-epochs", "1", "--",
                       "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1")
    check_ratios(rows(sweep), ["no cache", "teacher_cache=mmap (lazy)", "teacher_cache=mmap, precomputed by job 1"], 1)
