"""scripts/throughput.py measures every batch size × precision × pipeline × compile setting in one process,
each next to the plain-loop floor of its batch size and precision."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_script_reports_each_setting_with_its_ratio_to_the_floor():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "throughput.py"), "--batch-sizes", "16", "--precisions", "bf16-mixed",
         "--resident", "false", "true", "--compile", "false", "--steps", "2", "--warmup", "1", "--rounds", "2", "--",
         "data=synthetic", "data.train_size=64", "data.in_channels=1", "data.image_size=8", "data.num_classes=10",
         "teacher=convnet_large", "student=convnet_tiny", "distill=[kd]"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| (\d+) \| (\S+) \| ([^|]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)–([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (-?[\d.]+) \| ([\d.]+) \| (\d+) \|$",
                      result.stdout,
                      flags=re.MULTILINE)
    assert [(precision, step.strip()) for _, precision, step, *_ in rows] == [
        ("bf16-mixed", step) for step in ("floor (plain loop)", "Lightning, bare module",
                                          "fit, resident=false, compile=false", "fit, resident=true, compile=false")]
    # Each timed window holds exactly the 2 steps after the warm-up step (2 × 16 images); each ratio is a median
    # of the two rounds' ratios, so it lies in its range, and the floor's own ratio is exactly 1.
    assert [int(images) for *_, images in rows] == [32] * 4
    assert rows[0][4:7] == ("1.000", "1.000", "1.000") and rows[0][10] == "1.000"
    for row in rows[1:]:
        assert float(row[5]) <= float(row[4]) <= float(row[6])
        # The step's parts: time in the networks is part of the median step, and the step cost is positive.
        assert 0 < float(row[8]) <= float(row[7]) * 1.5 and float(row[10]) > 0
