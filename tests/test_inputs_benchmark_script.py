"""scripts/inputs_benchmark.py times a KD step without named inputs, with every role named on the one input, and
with a second view, interleaved per round, on both input paths."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_inputs_benchmark_reports_every_arm_on_both_paths_against_plain():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "inputs_benchmark.py"), "--rounds", "2", "--steps", "2", "--warmup",
         "1", "--", "data.augment=true", "data.batch_size=16"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| (DataLoader|device) \| ([^|]+) \| (\d+) \| ([\d.]+) \(([\d.]+)–([\d.]+)\) \|$",
                      result.stdout, flags=re.MULTILINE)
    assert [(path, arm.strip()) for path, arm, *_ in rows] == [
        (path, arm) for path in ("DataLoader", "device") for arm in ("plain", "named, one input", "second view")]
    for path, arm, _, median, low, high in rows:
        assert float(low) <= float(median) <= float(high)
        if arm == "plain":
            assert float(median) == 1.0  # each round's plain arm is its own reference
