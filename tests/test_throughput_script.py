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
    rows = re.findall(r"^\| (\S+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|$", result.stdout, flags=re.MULTILINE)
    assert [precision for precision, *_ in rows] == ["32-true", "bf16-mixed"]
    # The timed window holds exactly the 2 steps after the warm-up step (2 × 16 images), and each ratio is
    # that precision's rate over the first one's.
    assert [int(images) for *_, images in rows] == [32, 32]
    (_, fp32_rate, _, _), (_, bf16_rate, bf16_ratio, _) = rows
    assert abs(float(bf16_ratio) - float(bf16_rate) / float(fp32_rate)) <= 0.005  # rates are printed to 0.1 image/s
