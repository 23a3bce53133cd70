"""scripts/launcher_benchmark.py on a tiny sweep: the joblib launcher runs 2 jobs on 2 workers for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_parallel_launcher_runs_the_same_jobs_as_the_sequential_one(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "launcher_benchmark.py"), "--jobs", "2",
                             "--workers", "2", "--threads", "1", "--out", str(out), "--",
                             "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                             "trainer.limit_test_batches=1", "teacher.model.name=convnet_tiny"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "launcher_benchmark.json").read_text())
    # Seeded jobs: each job's metrics are the same whichever launcher ran it, and each job ran once.
    assert sorted(report["metrics"]["parallel"]) == ["0", "1"]
    assert report["metrics"]["parallel"] == report["metrics"]["basic"] and report["same_metrics"]
    assert report["metrics"]["parallel"]["0"] != report["metrics"]["parallel"]["1"]  # the seed reached the job
    parallel_configs = [(out / "parallel" / job / ".hydra" / "hydra.yaml").read_text() for job in ("0", "1")]
    assert all("JoblibLauncher" in text and "n_jobs: 2" in text for text in parallel_configs)
    assert "| 2 | parallel (joblib) | 2 × 1 |" in result.stdout
