"""scripts/datafree_benchmark.py end to end on digits at a tiny budget: the table's cells are the jobs' own
numbers (held-out val and test accuracy, one cached teacher for every row)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_benchmark_script import cells

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.val_fraction=0.2", "teacher.max_epochs=1", "trainer.max_epochs=1", "scheme.steps_per_epoch=2",
        "scheme.batch_size=8", "++scheme.generator.width=4", "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2"]


def row(markdown: str, method: str, seed: int = 0) -> list[str]:
    return cells(markdown, f"digits | {method} | {seed}")


@pytest.mark.slow
def test_datafree_benchmark_reports_each_jobs_held_out_and_test_accuracy(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nKept text.\n")
    out = tmp_path / "bench"
    command = [sys.executable, str(ROOT / "scripts" / "datafree_benchmark.py"), "--datasets", "digits", "--out",
               str(out), "--methods", "ZSKT", "--markdown", str(markdown), "--", *TINY]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nKept text.\n") and text.count("<!-- benchmark:datafree:start -->") == 1
    stages = json.loads((out / "runs" / "digits-ZSKT" / "results.json").read_text())["stages"]
    teacher, val, student, ratio = row(text, "ZSKT")[3:7]
    assert float(teacher) == pytest.approx(100 * stages["teacher"]["metrics"]["test/acc"], abs=0.006)
    assert float(val) == pytest.approx(100 * stages["student"]["metrics"]["val/acc"], abs=0.006)
    assert float(student) == pytest.approx(100 * stages["student"]["metrics"]["test/acc"], abs=0.006)
    assert float(ratio) == pytest.approx(float(student) / float(teacher), abs=0.002)
    # The warm-up trained the teacher the method's job loaded: one cached teacher, the same accuracy in both rows.
    assert row(text, "(warm-up: teacher training + job overhead)")[3] == teacher
    assert len(list((out / "cache" / "stages").glob("teacher-*.pt"))) == 1
    # A second invocation on the same --out adds its method to the table and keeps the first one's rows.
    command[command.index("--methods") + 1] = "floor: N(0,1) inputs"
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    again = markdown.read_text()
    assert row(again, "ZSKT") == row(text, "ZSKT")
    assert row(again, "floor: N(0,1) inputs")[3] == teacher
    assert row(again, "(warm-up: job overhead, cached teacher)")[3] == teacher
    assert row(again, "(warm-up: teacher training + job overhead)") == row(text, "(warm-up: teacher training + job overhead)")
    # Another run seed distils from the same cached teacher (teacher.seed is its own) and adds its rows beside
    # seed 0's, and the method's mean ± std over both.
    seeded = [*command[:command.index("--")], "--seeds", "1", *command[command.index("--"):]]
    result = subprocess.run(seeded, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    text = markdown.read_text()
    assert row(text, "floor: N(0,1) inputs") == row(again, "floor: N(0,1) inputs")
    assert row(text, "(warm-up: job overhead, cached teacher)", seed=1)[3] == teacher
    assert row(text, "floor: N(0,1) inputs", seed=1)[3] == teacher
    assert len(list((out / "cache" / "stages").glob("teacher-*.pt"))) == 1
    seed1 = json.loads((out / "runs" / "digits-seed1-N01_inputs" / "results.json").read_text())["stages"]
    assert float(row(text, "floor: N(0,1) inputs", seed=1)[5]) == pytest.approx(
        100 * seed1["student"]["metrics"]["test/acc"], abs=0.006)
    accs = [float(row(text, "floor: N(0,1) inputs", seed=seed)[5]) for seed in (0, 1)]
    summary = next(line for line in text.splitlines() if line.startswith("- digits, floor: N(0,1) inputs: "))
    mean, std = float(summary.split("student ")[1].split(" ± ")[0]), abs(accs[0] - accs[1]) / 2 ** 0.5
    assert mean == pytest.approx(sum(accs) / 2, abs=0.011) and "over seeds 0, 1" in summary
    assert float(summary.split(" ± ")[1].split("%")[0]) == pytest.approx(std, abs=0.011)
    # --render-only rebuilds the same section from the rows, running nothing.
    markdown.write_text("# Benchmarks\n")
    rendered = subprocess.run([sys.executable, str(ROOT / "scripts" / "datafree_benchmark.py"), "--out", str(out),
                               "--render-only", "--markdown", str(markdown)], cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, env=env)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    assert row(markdown.read_text(), "ZSKT") == row(text, "ZSKT")
    assert markdown.read_text().count("scripts/datafree_benchmark.py --datasets digits") == 3
    # Another budget's table goes into its own section (--section) and leaves this one alone.
    rendered = subprocess.run([sys.executable, str(ROOT / "scripts" / "datafree_benchmark.py"), "--out", str(out),
                               "--render-only", "--markdown", str(markdown), "--section", "datafree-long"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    both = markdown.read_text()
    assert both.count("<!-- benchmark:datafree:start -->") == 1 and "## datafree-long" in both
    assert both.count("<!-- benchmark:datafree-long:start -->") == 1
