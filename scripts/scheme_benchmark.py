"""Every scheme × seeds on one teacher/student pair, each stage of every run in one table.

    python scripts/scheme_benchmark.py --seeds 0,1,2,3,4 --out bench/schemes --markdown BENCHMARKS.md -- \\
        callbacks=none logger=none trainer.enable_progress_bar=false

One `kd-train -m seed=...` multirun per scheme (CASES), `--jobs` of them at a time, all sharing one stage
cache in `--out`: the teacher and the baselines are trained by the first job that needs them and loaded by
every other. A run's `results.json` lists all its stages (teachers, baselines, label smoothing, assistants,
generations, peers), so the table compares each scheme with the baseline and label smoothing of the same
seeds. Rows: mean ± sample std of test top-1 over seeds, Δ to the student baseline's mean. The section goes
between `<!-- benchmark:schemes:start/end -->` in `--markdown`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kd_lightning.markdown_sections import write_marked_section

MARK = "schemes"
# (label, kd-train overrides). The offline KD row is the reference every scheme is read against.
CASES: list[tuple[str, list[str]]] = [
    ("kd", ["distill=[kd]"]),
    # KD from the other two teachers of the multi-teacher row (same recipe, teacher seeds 1 and 2).
    ("kd_teacher2", ["distill=[kd]", "teacher.seed=1"]),
    ("kd_teacher3", ["distill=[kd]", "teacher.seed=2"]),
    ("multi_teacher", ["scheme=multi_teacher", "distill=[kd]",
                       "teachers=[convnet_large,convnet_large,convnet_large]"]),
    ("takd", ["scheme=takd", "distill=[kd]", "plan.chain=[convnet_large,convnet_small,convnet_tiny]"]),
    ("born_again", ["scheme=born_again", "distill=[kd]", "plan.generations=3"]),
    ("dml", ["scheme=dml", "scheme.peers=[convnet_tiny,convnet_tiny]"]),
    # No ramp override: the row measures the scheme's default ramp (a share of the epochs).
    ("kdcl", ["scheme=kdcl", "scheme.peers=[convnet_tiny,convnet_tiny]"]),
    ("byot", ["scheme=byot"]),
    ("cs_kd", ["scheme=cs_kd"]),
    ("tf_kd_self", ["scheme=tf_kd_self"]),
    ("tf_kd_reg", ["scheme=tf_kd_reg"]),
    ("mean_teacher", ["scheme=mean_teacher"]),
    # KD's recipe plus a logit discriminator (MEAL), read against the kd row seed by seed.
    ("adversarial", ["scheme=adversarial", "distill=[kd]"]),
]
BASELINE = "student baseline"
# scheme → the case its last stage is compared with on the same seeds (the difference, seed by seed).
PAIRED = {"adversarial": "kd"}


def run_case(label: str, overrides: list[str], args: argparse.Namespace, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    command = [sys.executable, "-m", "kd_lightning.train", "-m", f"seed={args.seeds}", *overrides,
               f"paths.cache_dir={out / 'cache'}", f"hydra.sweep.dir={out / 'sweeps' / label}", *args.overrides]
    start = time.monotonic()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / f"{label}.log", "w") as log:
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = round(time.monotonic() - start, 1)
    print(f"[schemes] {label}: exit {rc}, {wall} s", flush=True)
    return {"label": label, "rc": rc, "wall_s": wall, "command": shlex.join(command[1:])}


def stage_rows(results: dict) -> list[tuple[str, float]]:
    """(row name, test top-1 %) for every stage of one run; a stage of several networks gives one per network."""
    rows = []
    for record in results["stages"].values():
        metrics, label = record["metrics"], record["label"]
        roles = sorted({key.split("/")[1] for key in metrics if key.count("/") == 2 and key.endswith("/acc")})
        if roles:
            rows += [(f"{label} ({role})", 100 * metrics[f"test/{role}/acc"]) for role in roles]
        elif "test/acc" in metrics:
            rows.append((label, 100 * metrics["test/acc"]))
    return rows


def collect(out: Path) -> dict[str, dict[str, list[float]]]:
    table: dict[str, dict[str, list[float]]] = {}
    for label, _ in CASES:
        for results_file in sorted((out / "sweeps" / label).glob("*/results.json")):
            for row, accuracy in stage_rows(json.loads(results_file.read_text())):
                table.setdefault(label, {}).setdefault(row, []).append(accuracy)
    return table


def final_accuracy_by_seed(out: Path, label: str) -> dict[int, float]:
    """Test top-1 (%) of each run's last stage, keyed by the seed its job was launched with."""
    accuracies = {}
    for results_file in (out / "sweeps" / label).glob("*/results.json"):
        overrides = (results_file.parent / ".hydra" / "overrides.yaml").read_text().splitlines()
        seed = next(int(line.split("=", 1)[1]) for line in overrides if line.startswith("- seed="))
        accuracies[seed] = 100 * json.loads(results_file.read_text())["student_metrics"]["test/acc"]
    return accuracies


def paired_lines(out: Path) -> list[str]:
    lines = []
    for label, reference in PAIRED.items():
        own, other = final_accuracy_by_seed(out, label), final_accuracy_by_seed(out, reference)
        seeds = sorted(set(own) & set(other))
        if not seeds:
            continue
        deltas = [own[seed] - other[seed] for seed in seeds]
        spread = f" ± {statistics.stdev(deltas):.2f}" if len(deltas) > 1 else ""
        mean = statistics.mean(deltas)
        lines.append(f"`{label}` − `{reference}` (last stage, same seeds): {mean:+.2f}{spread} pp; "
                     f"per seed " + ", ".join(f"{seed}: {delta:+.2f}" for seed, delta in zip(seeds, deltas)) + ".")
    return lines


def render(table: dict[str, dict[str, list[float]]], meta: dict) -> str:
    # Every case's baseline stage is the same cached network per seed; read it from the first case.
    baseline = next((rows[BASELINE] for rows in table.values() if BASELINE in rows), None)
    base = statistics.mean(baseline) if baseline else None
    lines = [f"## {MARK}", "", "```bash", meta["command"], "```", "",
             f"{meta['date']}; {os.cpu_count()} CPUs, no GPU; wall time "
             f"{' + '.join(f'{wall / 60:.1f}' for wall in meta.get('invocations_s', [meta['wall_s']]))} min "
             f"({meta['jobs']} schemes at a time). Per scheme (s): "
             + ", ".join(f"{run['label']} {run['wall_s']:.0f}" + ("" if run["rc"] == 0 else f" (exit {run['rc']})")
                         for run in meta["runs"]) + ".", "",
             "| scheme | stage | test top-1 (%) | Δ vs baseline (pp) | seeds |", "| --- | --- | --- | --- | --- |"]
    for label, rows in table.items():
        for row, accs in rows.items():
            mean = statistics.mean(accs)
            spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
            delta = f"{mean - base:+.2f}" if base is not None and row != BASELINE else "–"
            lines.append(f"| `{label}` | {row} | {mean:.2f}{spread} | {delta} | {len(accs)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=Path("bench/schemes"))
    parser.add_argument("--jobs", type=int, default=2, help="schemes run at the same time")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per job")
    parser.add_argument("--only", default="", help="comma-separated scheme labels (default: all)")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("overrides", nargs="*", help="kd-train overrides for every run, after --")
    args = parser.parse_args()
    cases = [case for case in CASES if not args.only or case[0] in args.only.split(",")]
    # The teacher and the baseline first, alone, so the parallel jobs all load them from the cache.
    first = run_case(*cases[0], args, args.out)
    start = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = [first, *pool.map(lambda case: run_case(*case, args, args.out), cases[1:])]
    meta = {"command": "python scripts/scheme_benchmark.py " + shlex.join(sys.argv[1:]), "runs": runs,
            "date": datetime.date.today().isoformat(), "jobs": args.jobs,
            "wall_s": round(time.monotonic() - start + first["wall_s"], 1)}
    previous = args.out / "benchmark.json"
    if args.only and previous.is_file():  # a partial re-run: keep the other schemes' runs and time
        before = json.loads(previous.read_text())
        rerun = {run["label"] for run in runs}
        meta["runs"] = [run for run in before["runs"] if run["label"] not in rerun] + runs
        meta["invocations_s"] = [*before.get("invocations_s", [before["wall_s"]]), meta["wall_s"]]
        meta["command"] = before["command"] + "  # then: " + meta["command"]
    (args.out / "benchmark.json").write_text(json.dumps(meta, indent=2))
    section = "\n\n".join([render(collect(args.out), meta), *paired_lines(args.out)])
    print(section)
    if args.markdown:
        write_marked_section(args.markdown, MARK, section)
    sys.exit(0 if all(run["rc"] == 0 for run in runs) else 1)


if __name__ == "__main__":
    main()
