"""scripts/data_pipeline_benchmark.py times every pipeline of every data set in one run and prints ratios."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_benchmark_reports_each_pipeline_with_its_ratio_to_the_dataloader():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "data_pipeline_benchmark.py"), "--datasets", "digits", "cifar",
         "--workers", "0", "--cifar-size", "96", "--batch-size", "32", "--epochs", "1", "--warmup", "0",
         "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| (\w+) \| ([^|]+) \| ([\d.]+) \| (\d+) \| ([\d.]+) \| (\d+) \|$", result.stdout,
                      flags=re.MULTILINE)
    assert [(data, pipeline.strip()) for data, pipeline, *_ in rows] == [
        ("digits", "DataLoader, 0 workers"), ("digits", "device-resident"),
        ("cifar", "DataLoader, 0 workers"), ("cifar", "device-resident")]
    # A whole epoch each (1,437 digits, the 96 CIFAR-shaped images), and ratios of images/s to the DataLoader's.
    assert [int(images) for *_, images in rows] == [1437, 1437, 96, 96]
    for reference, row in ((rows[0], rows[1]), (rows[2], rows[3])):
        expected = int(row[3]) / int(reference[3])  # images/s are printed to the image, ratios to 0.01
        assert abs(float(row[4]) - expected) <= 0.005 + 0.002 * expected
