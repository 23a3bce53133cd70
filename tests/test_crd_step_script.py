"""scripts/crd_step.py runs CRD's step before and after the hot-path change; both give the same losses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_crd_step_script_compares_both_implementations_on_the_same_draws():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "crd_step.py"), "--batch", "8", "--nce-k", "64", "--rows", "400",
         "--classes", "10", "--steps", "2"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    agreement = float(re.search(r"agree to a relative ([\d.e+-]+)", result.stdout).group(1))
    assert agreement < 1e-5, result.stdout
    rows = re.findall(r"^\| (before|after) \| ([\d.]+) \| (-?\d+) \|$", result.stdout, flags=re.MULTILINE)
    assert [name for name, _, _ in rows] == ["before", "after"], result.stdout
