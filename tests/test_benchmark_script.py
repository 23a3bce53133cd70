"""scripts/benchmark.py end to end on digits: 2 methods × 2 seeds + baselines, table checked against the jobs."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "callbacks=none", "logger=none", "trainer.enable_progress_bar=false"]


def job_accuracies(out: Path) -> tuple[dict[str, list[float]], set[float]]:
    """Test top-1 (%) per distill value (or 'baseline') and the teacher's, read straight from the jobs."""
    per_method: dict[str, list[float]] = {}
    teacher = set()
    for results_file in out.glob("sweeps/*/*/results.json"):
        overrides_file = results_file.parent / ".hydra" / "overrides.yaml"
        overrides = dict(o.split("=", 1) for o in yaml.safe_load(overrides_file.read_text()))
        results = json.loads(results_file.read_text())
        key = "baseline" if overrides.get("scheme") == "supervised" else overrides["distill"]
        per_method.setdefault(key, []).append(100 * results["student_metrics"]["test/acc"])
        if "teacher" in results:
            teacher.add(round(100 * results["teacher"]["metrics"]["test/acc"], 6))
    return per_method, teacher


def cells(markdown: str, row_name: str) -> list[str]:
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {row_name} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


@pytest.mark.slow
def test_benchmark_runner_end_to_end(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nKept text.\n")
    out = tmp_path / "sweep"
    command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--name", "tiny", "--methods",
               "kd,[kd,at],nosuchterm", "--seeds", "0,1", "--out", str(out), "--markdown", str(markdown),
               "--plot-dir", str(tmp_path / "plots"), "--set", "data=digits",
               "--term-set", "kd+at:scheme.ce_weight=0.1", "--", *FAST]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    # The unknown method fails the shared multirun before any job; the retry runs each method on its own.
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no result for every seed of: nosuchterm" in result.stderr

    per_method, teacher = job_accuracies(out)
    assert sorted(per_method) == ["[kd,at]", "baseline", "kd"] and all(len(v) == 2 for v in per_method.values())
    assert len(teacher) == 1, "every job must distil from the same cached teacher"
    assert len(list((out / "cache" / "stages").glob("teacher-*.pt"))) == 1

    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nKept text.\n")
    assert text.count("<!-- benchmark:tiny:start -->") == 1 and text.count("<!-- benchmark:tiny:end -->") == 1
    assert "--methods 'kd,[kd,at],nosuchterm'" in text and "CPUs" in text and "wall time" in text
    assert re.search(r"\| `nosuchterm` \| failed \(exit \d+\): .*nosuchterm.* \| – \| 0 \|", text)
    base_mean = statistics.fmean(per_method["baseline"])
    for row_name, key in (("`kd`", "kd"), ("`kd+at`", "[kd,at]"), ("student baseline (CE only)", "baseline")):
        accuracy, delta, _, seeds = cells(text, row_name)[1:]
        mean, std = (float(x) for x in re.fullmatch(r"([\d.]+) ± ([\d.]+)", accuracy).groups())
        assert mean == pytest.approx(statistics.fmean(per_method[key]), abs=0.006)
        assert std == pytest.approx(statistics.stdev(per_method[key]), abs=0.006)
        assert seeds == "2"
        if key != "baseline":
            assert float(delta) == pytest.approx(statistics.fmean(per_method[key]) - base_mean, abs=0.011)
    assert float(cells(text, "teacher (trained once, cached)")[1]) == pytest.approx(teacher.pop(), abs=0.006)
    png = tmp_path / "plots" / "tiny.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Re-rendering replaces the section in place rather than appending a second one.
    png.unlink()
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--render-only", str(out),
                            "--markdown", str(markdown), "--plot-dir", str(tmp_path / "plots")],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert markdown.read_text() == text and png.is_file()


def test_method_list_keeps_combinations_whole():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    assert benchmark.split_top_level('kd, at,"[kd,crd]"'.replace('"', "")) == ["kd", "at", "[kd,crd]"]
    assert benchmark.label_of("[kd,crd]") == "kd+crd"
    args = benchmark.parse_args(["--methods", "kd,at,[kd,crd]", "--term-set", "crd:distill.crd.nce_k=8",
                                 "--term-set", "kd+crd:distill.kd.weight=1", "--set", "data=digits", "--",
                                 "trainer.max_epochs=1"])
    runs = benchmark.sweep_commands(args, Path("/o"))
    assert [labels for labels, _ in runs] == [["kd", "at"], ["kd+crd"], ["baseline"]]
    (_, together), (_, combo), (_, baseline) = runs
    assert "distill=kd,at" in together and "distill=[kd,crd]" in combo  # methods without overrides share a sweep
    assert {"distill.crd.nce_k=8", "distill.kd.weight=1"} <= set(combo)
    assert not any(arg.startswith("distill.") for arg in together + baseline)
    assert {"-m", "seed=0,1,2", "data=digits", "trainer.max_epochs=1", "paths.cache_dir=/o/cache"} <= set(baseline)
    assert "scheme=supervised" in baseline and "hydra.sweep.dir=/o/sweeps/kd_crd" in combo
    alone = benchmark.sweep_commands(args, Path("/o"), ["at"], tag="-alone")
    assert alone == [(["at"], [*together[:1], "distill=at", *together[2:-1], "hydra.sweep.dir=/o/sweeps/at-alone"])]
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--term-set", "crd-nce_k"])


def test_a_benchmark_section_is_replaced_in_place_and_the_others_are_kept(tmp_path):
    from kd_lightning.markdown_sections import write_marked_section

    markdown = tmp_path / "BENCHMARKS.md"
    write_marked_section(markdown, "a", "first a\n")
    write_marked_section(markdown, "b", "only b")
    markdown.write_text(markdown.read_text() + "\nnotes by hand\n")
    assert write_marked_section(markdown, "a", "second a") == "<!-- benchmark:a:start -->\nsecond a\n<!-- benchmark:a:end -->"
    assert markdown.read_text() == ("# Benchmarks\n\n<!-- benchmark:a:start -->\nsecond a\n<!-- benchmark:a:end -->\n\n"
                                    "<!-- benchmark:b:start -->\nonly b\n<!-- benchmark:b:end -->\n\nnotes by hand\n")


def test_the_table_pairs_each_method_with_the_baseline_of_the_same_seed(tmp_path):
    # Seed 1 is a harder draw for both networks: the paired column takes what a seed does to both out of the spread.
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import benchmark
    finally:
        sys.path.pop(0)
    jobs = {"baseline": ["scheme=supervised"], "kd": ["distill=kd", "baseline=false"]}
    accuracies = {"baseline": {0: 0.95, 1: 0.85, 2: 0.94}, "kd": {0: 0.96, 1: 0.86, 2: 0.93}}
    for label, overrides in jobs.items():
        for seed, acc in accuracies[label].items():
            job = tmp_path / "sweeps" / label / str(seed)
            job.mkdir(parents=True)
            (job / "results.json").write_text(json.dumps({"overrides": [*overrides, f"seed={seed}"],
                                                          "config_hash": f"{label}{seed}",
                                                          "student_metrics": {"test/acc": acc}}))
    table, _ = benchmark.render_table(tmp_path, {"seeds": 3, "runs": []})
    kd = cells(table, "`kd`")
    assert kd[3] == "+0.33 ± 1.15 (2/3 ahead)" and kd[2] == "+0.33" and kd[4] == "3"
    assert cells(table, "student baseline (CE only)")[3] == "–"
