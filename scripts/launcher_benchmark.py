"""Wall time of the same sweep under Hydra's basic (sequential) launcher and the joblib one (hydra/launcher=parallel).

    nice python scripts/launcher_benchmark.py --jobs 4 --workers 2 --out outputs/launcher_benchmark -- \
        trainer.max_epochs=3 student=convnet_small

Everything after `--` is a kd-train override. The sweep is `seed=0..jobs-1`, students only (baseline=false),
from one teacher trained and cached by an untimed first run, so both launchers time the same student jobs.
Every job, under either launcher, gets `--threads` torch threads (default cores // workers): the jobs are
then identical, so their metrics must agree bit for bit (torch's float reductions depend on the thread
count), and the ratio is what running `workers` of them at a time buys. Each timing is the whole `kd-train -m` command, process start-up included, since that
is what a user waits for. Prints a markdown row and writes `<out>/launcher_benchmark.json`, which also
says whether every job's metrics agree between the launchers (they are seeded, so they must).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ["baseline=false", "callbacks=none", "logger=none", "trainer.enable_progress_bar=false"]


def kd_train(args: list[str], cache: Path) -> float:
    env = {**os.environ, "KD_CACHE_DIR": str(cache), "WANDB_SILENT": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "kd_lightning.train", *args], env=env, capture_output=True,
                            text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"kd-train {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return elapsed


def job_metrics(sweep: Path) -> dict[str, dict[str, float]]:
    return {path.parent.name: json.loads(path.read_text())["student_metrics"]
            for path in sorted(sweep.glob("*/results.json"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every job")
    parser.add_argument("--out", type=Path, default=Path("outputs/launcher_benchmark"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    overrides, cache = [*DEFAULTS, *args.overrides], args.out / "cache"
    kd_train([*overrides, f"hydra.run.dir={args.out / 'teacher'}"], cache)  # trains and caches the teacher
    seeds = "seed=" + ",".join(str(seed) for seed in range(args.jobs))
    jobs = ["-m", seeds, *overrides, f"torch_threads={threads}"]
    sequential = kd_train([*jobs, f"hydra.sweep.dir={args.out / 'basic'}"], cache)
    parallel = kd_train([*jobs, "hydra/launcher=parallel", f"hydra.launcher.n_jobs={args.workers}",
                         f"hydra.sweep.dir={args.out / 'parallel'}"], cache)
    metrics = {name: job_metrics(args.out / name) for name in ("basic", "parallel")}
    report = {"jobs": args.jobs, "workers": args.workers, "torch_threads_per_job": threads,
              "cores": os.cpu_count(), "sequential_s": sequential, "parallel_s": parallel,
              "speedup": sequential / parallel, "overrides": overrides,
              "same_metrics": metrics["basic"] == metrics["parallel"] and len(metrics["basic"]) == args.jobs,
              "metrics": metrics}
    (args.out / "launcher_benchmark.json").write_text(json.dumps(report, indent=2))
    print("| jobs | launcher | workers × torch threads | wall (s) | speed-up | same metrics |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.jobs} | basic (sequential) | 1 × {threads} | {sequential:.1f} | 1.00 | |")
    print(f"| {args.jobs} | parallel (joblib) | {args.workers} × {threads} | {parallel:.1f} | "
          f"{sequential / parallel:.2f} | {'yes' if report['same_metrics'] else 'NO'} |")


if __name__ == "__main__":
    main()
