"""scripts/loss_share.py: each weighted loss's value and gradient norm next to CE's, as BENCHMARKS.md quotes them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_loss_share_measures_ce_and_each_term_on_the_student(tmp_path):
    fast = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "callbacks=none", "logger=none",
            "trainer.enable_progress_bar=false", f"paths.cache_dir={tmp_path / 'cache'}",
            f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}"]
    # From the trained baseline: the path that reads an earlier stage's product (a fresh student skips it).
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "loss_share.py"), "--batches", "2",
                             "--student-from", "baseline", "--", "distill=[at]", *fast],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    number = r"([\d.e+-]+)"
    rows = {name: (float(value), float(grad), float(ratio)) for name, value, grad, ratio in
            re.findall(rf"^\| (\w+) \| {number} \| {number} \| {number} \|$", result.stdout, flags=re.MULTILINE)}
    assert set(rows) == {"ce", "at"} and rows["ce"][2] == 1.0
    assert rows["at"][1] > 0 and abs(rows["at"][2] - rows["at"][1] / rows["ce"][1]) <= 0.01 * rows["at"][2] + 0.1
    assert "loss = 1.0·CE + 1000.0·at" in result.stdout
    assert "student stage1 (4, 8, 8)" in result.stdout and "teacher stage2 (64, 4, 4)" in result.stdout
