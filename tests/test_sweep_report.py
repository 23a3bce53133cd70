"""`kd-report` on a real `kd-train -m` sweep: every number checked against the jobs' results.json."""

from __future__ import annotations

import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["data=digits", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
         "trainer.enable_progress_bar=false", "callbacks=none", "logger=none"]


def kd_report_entry_point():
    """The function `[project.scripts]` installs as `kd-report`, resolved as the console script would."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["kd-report"]
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def kd_train(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "KD_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    return subprocess.run([str(Path(sys.executable).with_name("kd-train")), "-m", *args, *QUICK], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)


def cells(markdown: str, first_cell: str) -> list[str]:
    row = next(line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |"))
    return [cell.strip() for cell in row.strip("|").split("|")]


@pytest.mark.slow
def test_report_of_a_real_sweep_matches_the_jobs(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    result = kd_train(tmp_path, "distill=kd,at", "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    # A failing job recorded in the same sweep directory (a second multirun, its own subdirectory).
    failing = kd_train(tmp_path, "student.name=resnet9", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=failed")
    assert failing.returncode == 1, failing.stderr[-3000:]

    accs: dict[str, list[float]] = {}
    baselines: dict[str, list[float]] = {}
    teacher_params, student_params = set(), set()
    for results_file in sweep.glob("[0-9]*/results.json"):
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((results_file.parent / ".hydra" /
                                                                  "overrides.yaml").read_text()))
        results = json.loads(results_file.read_text())
        accs.setdefault(overrides["distill"], []).append(100 * results["student_metrics"]["test/acc"])
        baselines.setdefault(overrides["distill"], []).append(100 * results["baseline"]["test/acc"])
        teacher_params.add(results["teacher"]["size"]["student"]["params"])
        student_params.add(results["stages"]["student"]["size"]["student"]["params"])
    assert sorted(accs) == ["at", "kd"] and all(len(values) == 2 for values in accs.values())
    assert len(teacher_params) == 1 and len(student_params) == 1

    assert kd_report_entry_point()([str(sweep)]) == 0
    printed = capsys.readouterr().out
    report = (sweep / "report.md").read_text()
    assert printed.strip().startswith(report.split("\n![")[0].strip())
    for method in ("kd", "at"):
        configuration, stage, seeds, accuracy, delta, params, ratio = cells(report, f"`distill={method}`")
        assert stage == f"student + {method}" and seeds == "2"
        mean, std = (float(x) for x in re.fullmatch(r"([\d.]+) ± ([\d.]+)", accuracy).groups())
        assert mean == pytest.approx(statistics.fmean(accs[method]), abs=0.006)
        assert std == pytest.approx(statistics.stdev(accs[method]), abs=0.006)
        expected_delta = statistics.fmean(accs[method]) - statistics.fmean(baselines[method])
        assert float(delta) == pytest.approx(expected_delta, abs=0.011)
        assert params == str(student_params.copy().pop())
        assert float(ratio) == pytest.approx(student_params.copy().pop() / teacher_params.copy().pop(), rel=0.006)
    failed_rows = [line for line in report.splitlines() if line.startswith("| failed |")]
    assert len(failed_rows) == 1 and "ConfigError: Unknown model 'resnet9'" in failed_rows[0]
    assert (sweep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_directory_without_results_is_refused_in_one_paragraph(tmp_path):
    (tmp_path / "sweep" / "0").mkdir(parents=True)
    result = subprocess.run([sys.executable, "-m", "kd_lightning.sweeps.report", str(tmp_path / "sweep")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert message.startswith("kd-report: error: ") and "\n" not in message, message
    assert "holds no results.json" in message and "hydra.sweep.dir" in message
    assert not (tmp_path / "sweep" / "report.md").exists()


def write_job(job_dir: Path, overrides: list[str], peer_accs: dict[str, float], baseline: float | None) -> None:
    """A results.json shaped as kd-train writes it for a scheme whose last stage trains peers."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    metrics = {f"test/{role}/acc": acc for role, acc in peer_accs.items()}
    results = {"stages": {"student": {"label": "online dml", "metrics": metrics,
                                      "size": {role: {"params": 1000, "flops": 1} for role in peer_accs}}},
               "student_metrics": {**metrics, "test/acc": max(peer_accs.values())}}
    if baseline is not None:
        results["baseline"] = {"test/acc": baseline}
    (job_dir / "results.json").write_text(json.dumps(results))


def test_peers_get_a_row_each_and_a_missing_baseline_gives_no_delta(tmp_path):
    write_job(tmp_path / "0", ["scheme=dml", "seed=0"], {"peer1": 0.5, "peer2": 0.7}, baseline=0.4)
    write_job(tmp_path / "1", ["scheme=dml", "seed=1"], {"peer1": 0.6, "peer2": 0.9}, baseline=0.6)
    write_job(tmp_path / "2", ["scheme=dml", "lr=1", "seed=0"], {"peer1": 0.5, "peer2": 0.5}, baseline=0.4)
    write_job(tmp_path / "3", ["scheme=dml", "lr=1", "seed=1"], {"peer1": 0.5, "peer2": 0.5}, baseline=None)
    report = kd_report_entry_point()([str(tmp_path)]) == 0 and (tmp_path / "report.md").read_text()
    assert "Every row also sets `scheme=dml`." in report
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in report.splitlines()
            if line.startswith("| `")]
    # Names keep only what differs between configurations; each peer's own accuracy, not the best one's.
    assert [row[:5] for row in rows] == [
        ["`(shared overrides only)`", "online dml (peer1)", "2", f"55.00 ± {statistics.stdev([50, 60]):.2f}", "+5.00"],
        ["`(shared overrides only)`", "online dml (peer2)", "2", f"80.00 ± {statistics.stdev([70, 90]):.2f}", "+30.00"],
        ["`lr=1`", "online dml (peer1)", "2", "50.00 ± 0.00", "–"],
        ["`lr=1`", "online dml (peer2)", "2", "50.00 ± 0.00", "–"]]


def test_a_seed_run_twice_counts_once_with_the_newest_result(tmp_path):
    write_job(tmp_path / "first" / "0", ["seed=0"], {"peer1": 0.1, "peer2": 0.1}, baseline=0.1)
    write_job(tmp_path / "rerun" / "0", ["seed=0"], {"peer1": 0.3, "peer2": 0.3}, baseline=0.1)
    os.utime(tmp_path / "first" / "0" / "results.json", (1, 1))
    assert kd_report_entry_point()([str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert cells(report, "`(shared overrides only)`")[2:5] == ["1", "30.00", "+20.00"]


def test_a_sweep_that_logged_to_wandb_gets_one_summary_run_with_the_table_and_the_plot(tmp_path, monkeypatch):
    from wandb_offline import run_record

    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = tmp_path / "kd_sweep"
    wandb = {"project": "kd_tests", "entity": None, "group": "kd_sweep", "offline": True}
    for job, (seed, accs) in enumerate([("0", {"peer1": 0.5, "peer2": 0.7}), ("1", {"peer1": 0.6, "peer2": 0.9})]):
        write_job(sweep / str(job), ["scheme=dml", f"seed={seed}"], accs, baseline=0.4)
        results = json.loads((sweep / str(job) / "results.json").read_text())
        (sweep / str(job) / "results.json").write_text(json.dumps({**results, "wandb": wandb}))
    (sweep / "2").mkdir()
    (sweep / "2" / "error.json").write_text(json.dumps({"dir": str(sweep / "2"), "overrides": ["seed=2"],
                                                       "error_type": "ConfigError", "message": "no such model"}))
    assert kd_report_entry_point()([str(sweep), "--no-wandb"]) == 0
    assert not (sweep / "wandb").exists()

    assert kd_report_entry_point()([str(sweep)]) == 0
    (summary,) = (sweep / "wandb").glob("offline-run-*")
    record = run_record(summary)
    assert (record.project, record.run_group, record.job_type) == ("kd_tests", "kd_sweep", "report")
    media = summary / "files" / "media"
    report = json.loads(next((media / "table").glob("report_*.table.json")).read_text())
    assert [row[:6] for row in report["data"]] == [
        ["(shared overrides only)", "online dml (peer1)", 2, pytest.approx(55.0), pytest.approx(statistics.stdev([50, 60])),
         pytest.approx(15.0)],
        ["(shared overrides only)", "online dml (peer2)", 2, pytest.approx(80.0), pytest.approx(statistics.stdev([70, 90])),
         pytest.approx(40.0)]]
    failed = json.loads(next((media / "table").glob("failed_jobs_*.table.json")).read_text())
    assert failed["data"] == [["2", "seed=2", "ConfigError: no such model"]]
    assert next((media / "images").glob("plot_*.png")).read_bytes() == (sweep / "report.png").read_bytes()


def test_a_wandb_summary_that_cannot_start_is_refused_in_one_paragraph_after_the_report(tmp_path):
    write_job(tmp_path / "sweep" / "0", ["seed=0"], {"peer1": 0.5, "peer2": 0.7}, baseline=0.4)
    results = json.loads((tmp_path / "sweep" / "0" / "results.json").read_text())
    wandb = {"project": "kd_tests", "entity": None, "group": "sweep", "offline": False}
    (tmp_path / "sweep" / "0" / "results.json").write_text(json.dumps({**results, "wandb": wandb}))
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_MODE="online", WANDB_SILENT="true")  # online, and never logged in
    result = subprocess.run([sys.executable, "-m", "kd_lightning.sweeps.report", str(tmp_path / "sweep")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("kd-report: error: The W&B summary run of ") and "--no-wandb" in message, message
    assert (tmp_path / "sweep" / "report.md").is_file()


def test_results_name_their_own_config_and_a_failure_fixed_elsewhere_is_not_listed(tmp_path):
    # A re-run sweep renumbered job 0: Hydra rewrote 0/.hydra/overrides.yaml for seed 0, the result there is
    # still seed 1's; seed 0 failed in job 1 once and succeeded in job 2 since.
    write_job(tmp_path / "0", ["seed=0"], {"peer1": 0.2, "peer2": 0.2}, baseline=0.1)
    write_job(tmp_path / "2", ["seed=0"], {"peer1": 0.4, "peer2": 0.4}, baseline=0.1)
    for job, seed, digest in (("0", "seed=1", "hash-seed-1"), ("2", "seed=0", "hash-seed-0")):
        results = json.loads((tmp_path / job / "results.json").read_text())
        (tmp_path / job / "results.json").write_text(json.dumps({**results, "config_hash": digest,
                                                                 "overrides": [seed]}))
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "error.json").write_text(json.dumps({"dir": str(tmp_path / "1"), "overrides": ["seed=0"],
                                                          "config_hash": "hash-seed-0", "error_type": "OSError",
                                                          "message": "disk full"}))
    assert kd_report_entry_point()([str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert cells(report, "`(shared overrides only)`")[2:4] == ["2", f"30.00 ± {statistics.stdev([20, 40]):.2f}"]
    assert "Failed jobs" not in report and "0 failed jobs" in report


def test_search_trials_without_test_metrics_are_reported_by_their_objective(tmp_path):
    # Search trials run with evaluate_test=false: results.json holds val/acc (the objective) and no test/acc.
    for job, (seed, lr, acc, baseline) in enumerate([(0, 0.1, 0.50, 0.40), (1, 0.1, 0.70, 0.50), (0, 0.2, 0.30, 0.40)]):
        job_dir = tmp_path / str(job)
        job_dir.mkdir()
        (job_dir / "results.json").write_text(json.dumps({
            "overrides": [f"optimizer.lr={lr}", f"seed={seed}"], "optimized_metric": "val/acc",
            "stages": {"student": {"label": "student + kd", "metrics": {"val/acc": acc}, "size": {}}},
            "student_metrics": {"val/acc": acc, "val/acc_best": acc}, "baseline": {"val/acc": baseline}}))
    assert kd_report_entry_point()([str(tmp_path), "--no-wandb"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| val/acc (search objective; trials skip test) (%) |" in report and "test top-1 (%)" not in report
    assert cells(report, "`optimizer.lr=0.1`")[2:5] == ["2", f"60.00 ± {statistics.stdev([50, 70]):.2f}", "+15.00"]
    assert cells(report, "`optimizer.lr=0.2`")[2:5] == ["1", "30.00", "-10.00"]


def test_a_multi_objective_search_gets_its_pareto_front_as_a_table_and_a_plot(tmp_path):
    # (val/acc, student params): the third is beaten by the second on both, the others trade one for the other.
    for job, (student, acc, params) in enumerate([("a", 0.9, 9000), ("b", 0.8, 3000), ("c", 0.7, 5000),
                                                  ("d", 0.6, 1000)]):
        job_dir = tmp_path / str(job)
        job_dir.mkdir()
        (job_dir / "results.json").write_text(json.dumps({
            "overrides": [f"student={student}", "data=digits"], "optimized_metric": "val/acc",
            "second_objective": "student/params", "config_hash": student,
            "stages": {"student": {"label": "student + kd", "metrics": {"val/acc": acc},
                                   "size": {"student": {"params": params, "flops": 10 * params}}}},
            "student_metrics": {"val/acc": acc}}))
    assert kd_report_entry_point()([str(tmp_path), "--no-wandb"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "3 of 4 trials are not beaten on both val/acc and student/params." in report
    front = report.split("## Pareto front")[1]
    assert [line.split("|")[1].strip() for line in front.splitlines() if line.startswith("| `")] == \
        ["`student=d`", "`student=b`", "`student=a`"]  # by size; student=c is dominated
    assert (tmp_path / "pareto.png").stat().st_size > 0
