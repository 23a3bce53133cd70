"""scripts/throughput.py measures every requested precision in one process and prints ratios."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_throughput_script_reports_each_precision_with_its_ratio():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "throughput.py"), "--precisions", "32-true", "bf16-mixed",
         "--steps", "2", "--warmup", "1", "--", "data=synthetic", "data.train_size=64", "data.batch_size=16",
         "data.in_channels=1", "data.image_size=8", "data.num_classes=10", "teacher=convnet_large",
         "student=convnet_tiny", "distill=[kd]"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| (\S+) \| ([\d.]+) \| ([\d.]+) \|$", result.stdout, flags=re.MULTILINE)
    assert [precision for precision, _, _ in rows] == ["32-true", "bf16-mixed"]
    assert float(rows[0][2]) == 1.0 and all(float(rate) > 0 for _, rate, _ in rows)
