"""`kd-report <sweep dir>`: one table and one plot across the jobs of a `kd-train -m` sweep.

Jobs are grouped by their overrides minus `seed=...`, so each row is one configuration's last stage (the
student, or each peer) with the mean ± sample std of test top-1 over its seeds. Δ is taken against the
`baseline` stage of the same jobs, so a row is only compared with students trained on its own seeds.
Search trials test nothing (`evaluate_test=false`): a sweep whose jobs hold no test top-1 is reported by
the objective the trials were selected on (`optimized_metric`, e.g. `val/acc`), and labelled so. A
multi-objective search (`second_objective`: the student's params or FLOPs) also gets its Pareto front: every
trial's objective against its size, the non-dominated ones in a table and highlighted in `pareto.png`.
Failed jobs (their `error.json`, see kd_lightning/sweeps/failures.py) close the table with their error; trials a
search's pruner stopped (their `pruned.json`, kd_lightning/sweeps/pruning.py) are listed as pruned, not failed. A config
run more than once (a re-run sweep, a retried seed) counts once. When the jobs logged to W&B, the table and
plot also go to one W&B summary run in the sweep's group (kd_lightning/sweeps/wandb_summary.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from kd_lightning.errors import ConfigError
from kd_lightning.sweeps.objective import DEFAULT_METRIC
from kd_lightning.report import _count
from kd_lightning.sweeps.failures import ERROR_FILE
from kd_lightning.sweeps.pruned import PRUNED_FILE
from kd_lightning.sweeps.wandb_summary import log_summary_run

REPORT_FILE = "report.md"
PLOT_FILE = "report.png"
PARETO_PLOT_FILE = "pareto.png"
TEST_METRIC = "test/acc"


@dataclass
class Row:
    configuration: tuple[str, ...]
    stage: str
    metric: str = TEST_METRIC  # what `accs` and `baselines` hold
    accs: list[float] = field(default_factory=list)  # percent, one per seed
    baselines: list[float] = field(default_factory=list)  # percent, from the same jobs as `accs`
    params: int | None = None
    teacher_params: int | None = None

    def delta(self) -> float | None:
        # Only when every job of the row trained its baseline: a partial one would compare different seeds.
        if not self.baselines or len(self.baselines) != len(self.accs):
            return None
        return statistics.fmean(self.accs) - statistics.fmean(self.baselines)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def job_overrides(job_dir: Path) -> list[str]:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    return [str(item) for item in yaml.safe_load(overrides_file.read_text()) or []] if overrides_file.is_file() else []


def without_seed(overrides: list[str]) -> tuple[str, ...]:
    return tuple(item for item in overrides if not item.lstrip("+~").startswith("seed="))


def seed_of(overrides: list[str]) -> str:
    return next((item.split("=", 1)[1] for item in overrides if item.lstrip("+~").startswith("seed=")), "default")


def report_metric(jobs: list[tuple[list[str], dict[str, Any]]]) -> str:
    """Test top-1 when every job has it; else the search objective the jobs recorded (trials test nothing)."""
    if all(TEST_METRIC in results["student_metrics"] for _, results in jobs):
        return TEST_METRIC
    return next((results["optimized_metric"] for _, results in jobs if results.get("optimized_metric")),
                DEFAULT_METRIC)


def metric_label(metric: str) -> str:
    return "test top-1" if metric == TEST_METRIC else f"{metric} (search objective; trials skip test)"


def last_stage_rows(results: dict[str, Any], metric: str = TEST_METRIC) -> list[tuple[str, float | None, int | None]]:
    """(stage label, `metric` in %, params) for the last stage: one per peer when the stage logs each peer's
    `test/<role>/acc` (as the closing table of kd_lightning.pipeline does), else one for the stage; None where
    the job did not record `metric`."""
    record = list(results.get("stages", {}).values() or [{}])[-1]  # results written before stages were kept
    metrics, sizes = record.get("metrics") or results["student_metrics"], record.get("size", {})
    if metric == TEST_METRIC and len(sizes) > 1 and all(f"test/{role}/acc" in metrics for role in sizes):
        return [(f"{record['label']} ({role})", 100 * metrics[f"test/{role}/acc"], size.get("params"))
                for role, size in sizes.items()]
    first = next(iter(sizes.values()), {})
    value = results["student_metrics"].get(metric)
    return [(record.get("label", "student"), None if value is None else 100 * value, first.get("params"))]


def job_results(sweep_dir: Path) -> list[tuple[list[str], dict[str, Any]]]:
    """(overrides, results) per job in the order configs first appear; a config run twice (same config hash)
    counts once, with its newest result.

    A job's own results.json names its overrides; `.hydra/overrides.yaml` only for results written before
    it did: a re-run sweep whose jobs were renumbered rewrites that file for another config.
    """
    newest: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for results_file in sorted(sweep_dir.rglob("results.json"), key=lambda path: path.stat().st_mtime):
        results = json.loads(results_file.read_text())
        overrides = results["overrides"] if "overrides" in results else job_overrides(results_file.parent)
        newest[results.get("config_hash") or str(results_file)] = (overrides, results)
    return list(newest.values())


def collect(sweep_dir: Path) -> list[Row]:
    """Rows in the order their configurations first appear; a seed run twice counts once (the newest job)."""
    jobs = job_results(sweep_dir)
    metric = report_metric(jobs)
    newest: dict[tuple[tuple[str, ...], str], dict[str, Any]] = {}
    for overrides, results in jobs:
        newest[without_seed(overrides), seed_of(overrides)] = results
    rows: dict[tuple[tuple[str, ...], str], Row] = {}
    for (configuration, _), results in sorted(newest.items(), key=lambda item: item[0][1]):
        teacher_params = results.get("teacher", {}).get("size", {}).get("student", {}).get("params")
        for stage, acc, params in last_stage_rows(results, metric):
            if acc is None:  # a job that recorded neither test top-1 nor the objective: nothing to compare
                continue
            row = rows.setdefault((configuration, stage), Row(configuration, stage, metric, params=params,
                                                              teacher_params=teacher_params))
            row.accs.append(acc)
            if metric in results.get("baseline", {}):
                row.baselines.append(100 * results["baseline"][metric])
    order = list(dict.fromkeys(configuration for configuration, _ in newest))
    return sorted(rows.values(), key=lambda row: order.index(row.configuration))


def failures(sweep_dir: Path) -> list[dict[str, Any]]:
    """Failed jobs whose config has no result (a re-run of the sweep may have trained it since)."""
    records = [json.loads(path.read_text()) for path in sorted(sweep_dir.rglob(ERROR_FILE))]
    finished = {results.get("config_hash") for _, results in job_results(sweep_dir)} - {None}

    def has_result(record: dict[str, Any]) -> bool:
        if record.get("config_hash"):
            return record["config_hash"] in finished
        return (Path(record.get("dir", "")) / "results.json").is_file()  # recorded before jobs had hashes

    return [record for record in records if not has_result(record)]


def pruned(sweep_dir: Path) -> list[dict[str, Any]]:
    """Trials the search's pruner stopped, by trial number; a config that later finished is not listed."""
    finished = {results.get("config_hash") for _, results in job_results(sweep_dir)} - {None}
    records = [json.loads(path.read_text()) | {"dir": str(path.parent)} for path in sweep_dir.rglob(PRUNED_FILE)]
    return sorted((record for record in records if record.get("config_hash") not in finished),
                  key=lambda record: record["pruned"]["trial"])


@dataclass
class Point:
    """One trial of a multi-objective search: its objective (%, higher is better) and size (lower is better)."""

    overrides: list[str]
    value: float
    size: int
    front: bool = False


def pareto_points(sweep_dir: Path) -> tuple[str, str, list[Point]] | None:
    """(objective, size objective, points with the front marked) of a multi-objective search, else None."""
    from kd_lightning.sweeps.objective import SIZE_OBJECTIVES

    jobs = [(overrides, results) for overrides, results in job_results(sweep_dir) if results.get("second_objective")]
    if not jobs:
        return None
    metric, second = jobs[0][1].get("optimized_metric", DEFAULT_METRIC), jobs[0][1]["second_objective"]
    points = []
    for overrides, results in jobs:
        value = results["student_metrics"].get(metric)
        size = next(iter(list(results["stages"].values())[-1].get("size", {}).values()), {}).get(
            SIZE_OBJECTIVES[second])
        if value is not None and size is not None:
            points.append(Point(overrides, 100 * value, int(size)))
    for point in points:
        point.front = not any(other.value >= point.value and other.size <= point.size
                              and (other.value > point.value or other.size < point.size) for other in points)
    return metric, second, points


def render_pareto(metric: str, second: str, points: list[Point], shared: set[str]) -> list[str]:
    front = sorted((p for p in points if p.front), key=lambda p: p.size)
    lines = ["", "## Pareto front", "",
             f"{len(front)} of {len(points)} trials are not beaten on both {metric} and {second}.", "",
             f"| overrides | {metric} (%) | {second} |", "| --- | --- | --- |"]
    for point in front:
        overrides = " ".join(item for item in point.overrides if item not in shared)
        lines.append(f"| `{overrides}` | {point.value:.2f} | {_count(point.size)} |")
    return lines + ["", f"![Pareto front]({PARETO_PLOT_FILE})"]


def plot_pareto(metric: str, second: str, points: list[Point], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rest = [p for p in points if not p.front]
    front = sorted((p for p in points if p.front), key=lambda p: p.size)
    ax.scatter([p.size for p in rest], [p.value for p in rest], color="#999999", label="trial")
    ax.plot([p.size for p in front], [p.value for p in front], "o-", color="#c44e52", label="Pareto front")
    ax.set_xlabel(second)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def shared_overrides(rows: list[Row]) -> list[str]:
    every = [set(row.configuration) for row in rows]
    shared = set.intersection(*every) if len(every) > 1 else set()
    return [item for item in rows[0].configuration if item in shared]


def configuration_names(rows: list[Row]) -> dict[tuple[str, ...], str]:
    """What each configuration sets that not every row sets: the shared overrides say nothing about a row."""
    shared = set(shared_overrides(rows))
    return {row.configuration: " ".join(item for item in row.configuration if item not in shared)
            or "(shared overrides only)" for row in rows}


def job_dir_name(sweep_dir: Path, record: dict[str, Any]) -> str:
    job_dir = Path(record.get("dir", "?"))
    return str(job_dir.relative_to(sweep_dir)) if job_dir.is_relative_to(sweep_dir) else str(job_dir)


def render_markdown(sweep_dir: Path, rows: list[Row], failed: list[dict[str, Any]],
                    stopped: list[dict[str, Any]] = ()) -> str:
    names = configuration_names(rows)
    label = metric_label(rows[0].metric)
    lines = [f"# Sweep report: {sweep_dir.name}", "",
             f"{sum(len(row.accs) for row in rows)} results ({len(rows)} rows), {len(failed)} failed jobs"
             + (f", {len(stopped)} pruned trials. " if stopped else ". ") +
             f"{label[0].upper() + label[1:]} is the mean ± sample std over seeds; Δ is against the mean of the "
             "`baseline` stage of the same jobs." + (f" Every row also sets `{' '.join(shared_overrides(rows))}`."
                                                     if shared_overrides(rows) else ""), "",
             f"| configuration | stage | seeds | {label} (%) | Δ vs baseline (pp) | params | params / teacher |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        mean, std = mean_std(row.accs)
        delta = row.delta()
        ratio = (f"{row.params / row.teacher_params:.3g}" if row.params is not None and row.teacher_params
                 else "–")
        lines.append(f"| `{names[row.configuration]}` | {row.stage} | {len(row.accs)} | "
                     f"{mean:.2f}{'' if std is None else f' ± {std:.2f}'} | "
                     f"{'–' if delta is None else f'{delta:+.2f}'} | "
                     f"{'–' if row.params is None else _count(row.params)} | {ratio} |")
    if stopped:
        shared = set(shared_overrides(rows))
        lines += ["", "## Pruned trials", "", "Stopped by the search's pruner; their value is the last epoch's.", "",
                  f"| trial | job dir | overrides | pruned after epoch | {rows[0].metric} (%) |",
                  "| --- | --- | --- | --- | --- |"]
        for record in stopped:
            overrides = " ".join(item for item in record.get("overrides", []) if item not in shared)
            lines.append(f"| {record['pruned']['trial']} | {job_dir_name(sweep_dir, record)} | `{overrides}` | "
                         f"{record['pruned']['epoch']} | {100 * record['pruned']['value']:.2f} |")
    if failed:
        lines += ["", "## Failed jobs", "", "| job dir | overrides | error |", "| --- | --- | --- |"]
        for record in failed:
            message = f"{record.get('error_type', 'error')}: {record.get('message', '')}"
            lines.append(f"| {job_dir_name(sweep_dir, record)} | `{' '.join(record.get('overrides', []))}` | "
                         f"{message.replace('|', '/').replace(chr(10), ' ')} |")
    return "\n".join(lines) + "\n"


def plot(bars: list[tuple[str, float, float, float | None]], lines: dict[str, float], path: Path,
         title: str, metric: str = "test top-1") -> None:
    """Horizontal bars (name, mean, std, own baseline or None) with the baseline of each bar as a black tick,
    and `lines` (name → value) as vertical reference lines across all bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.3 * len(bars) + 1.5))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], xerr=[b[2] for b in bars], color="#4c72b0", capsize=2)
    own = [(index, b[3]) for index, b in enumerate(bars) if b[3] is not None]
    if own:
        ax.scatter([value for _, value in own], [index for index, _ in own], marker="|", s=300, color="#c44e52",
                   zorder=3, label="its baseline")
    for (name, value), style in zip(lines.items(), ("--", ":", "-.")):
        ax.axvline(value, color="black", linestyle=style, label=f"{name} {value:.2f}")
    values = [b[1] - b[2] for b in bars] + [b[1] + b[2] for b in bars] + [v for _, v in own] + list(lines.values())
    low, high = min(values), max(values)
    ax.set_xlim(low - 0.1 * (high - low + 1), high + 0.1 * (high - low + 1))
    ax.invert_yaxis()  # top to bottom in the table's order
    ax.set_xlabel(f"{metric} (%), mean ± std over seeds")
    ax.set_title(title)
    if own or lines:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep_dir: Path, wandb_summary: bool = True) -> tuple[str, Path | None]:
    """Write `<sweep>/report.md` and `<sweep>/report.png` (and the W&B summary run when the jobs logged to W&B);
    the markdown and the summary run's directory."""
    sweep_dir = sweep_dir.resolve()  # job records hold absolute dirs
    if not sweep_dir.is_dir():
        raise ConfigError(f"{sweep_dir} is not a directory. Pass the sweep directory of a `kd-train -m` run "
                          f"(its hydra.sweep.dir, e.g. multirun/<date>/<time>).")
    rows, failed, stopped = collect(sweep_dir), failures(sweep_dir), pruned(sweep_dir)
    if not rows:
        why = (f": all {len(failed)} of its recorded jobs failed (see {sweep_dir / 'failures.json'})" if failed
               else f": all {len(stopped)} of its trials were pruned" if stopped else " and no failed job either")
        raise ConfigError(f"{sweep_dir} holds no results.json in any job directory{why}. Pass the "
                          f"hydra.sweep.dir of a `kd-train -m` sweep whose jobs have finished, e.g. "
                          f"`kd-report multirun/<date>/<time>`.")
    markdown = render_markdown(sweep_dir, rows, failed, stopped)
    names = configuration_names(rows)
    rows_per_configuration = {configuration: sum(row.configuration == configuration for row in rows)
                              for configuration in names}
    bars = []
    for row in rows:
        mean, std = mean_std(row.accs)
        baseline = mean - row.delta() if row.delta() is not None else None
        name = names[row.configuration] + (f" / {row.stage}" if rows_per_configuration[row.configuration] > 1 else "")
        bars.append((name if len(name) <= 60 else name[:57] + "...", mean, std or 0.0,
                     baseline))
    plot(bars, {}, sweep_dir / PLOT_FILE, sweep_dir.name, metric_label(rows[0].metric))
    if (pareto := pareto_points(sweep_dir)) is not None:
        markdown += "\n".join(render_pareto(*pareto, set(shared_overrides(rows)))) + "\n"
        plot_pareto(*pareto, sweep_dir / PARETO_PLOT_FILE, sweep_dir.name)
    (sweep_dir / REPORT_FILE).write_text(markdown + f"\n![{sweep_dir.name}]({PLOT_FILE})\n")
    settings = sweep_wandb_settings(sweep_dir) if wandb_summary else None
    if settings is None:
        return markdown, None
    tables = {"report": (report_columns(rows[0].metric), report_table_data(rows))}
    if failed:
        tables["failed_jobs"] = (["job dir", "overrides", "error"], [
            [job_dir_name(sweep_dir, record), " ".join(record.get("overrides", [])),
             f"{record.get('error_type', 'error')}: {record.get('message', '')}"] for record in failed])
    config = {"sweep_dir": str(sweep_dir), "results": sum(len(row.accs) for row in rows), "failed_jobs": len(failed),
              "pruned_trials": len(stopped)}
    return markdown, log_summary_run(settings, sweep_dir, tables, sweep_dir / PLOT_FILE, config)


def report_columns(metric: str = TEST_METRIC) -> list[str]:
    name = "test top-1" if metric == TEST_METRIC else metric
    return ["configuration", "stage", "seeds", f"{name} mean (%)", f"{name} std (%)", "delta vs baseline (pp)",
            "params", "params / teacher"]


def report_table_data(rows: list[Row]) -> list[list[Any]]:
    """The markdown table's rows as numbers (None where it shows –)."""
    names = configuration_names(rows)
    data = []
    for row in rows:
        mean, std = mean_std(row.accs)
        ratio = row.params / row.teacher_params if row.params is not None and row.teacher_params else None
        data.append([names[row.configuration], row.stage, len(row.accs), mean, std, row.delta(), row.params, ratio])
    return data


def sweep_wandb_settings(sweep_dir: Path) -> dict[str, Any] | None:
    """The W&B settings of the sweep's jobs (the first job that logged to W&B), or None when none did."""
    return next((results["wandb"] for _, results in job_results(sweep_dir) if results.get("wandb")), None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kd-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="the hydra.sweep.dir of a `kd-train -m` run")
    parser.add_argument("--no-wandb", action="store_true", help="no W&B summary run, even if the jobs logged to W&B")
    args = parser.parse_args(argv)
    try:
        markdown, summary_run = write_report(args.sweep_dir, wandb_summary=not args.no_wandb)
    except ConfigError as error:
        print(f"kd-report: error: {error}", file=sys.stderr)
        return 2
    print(markdown)
    print(f"[kd-report] wrote {args.sweep_dir / REPORT_FILE} and {args.sweep_dir / PLOT_FILE}"
          + (f"; W&B summary run {summary_run}" if summary_run else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
