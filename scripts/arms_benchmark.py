"""Compare arms (any overrides: a scheme, terms, inputs, a label share) over seeds, each against its own baseline.

    python scripts/arms_benchmark.py --name uci_zernike --seeds 0,1,2,3,4 --jobs 2 \\
        --arm "kd=distill=[kd]" --arm "supervision transfer=scheme=supervision_transfer" \\
        -- data=mfeat teacher=mlp_large student=mlp_small inputs.teacher=pixels inputs.student=zernike

Each arm is one `kd-train -m seed=...` with the common overrides after `--` and its own (`NAME=OVERRIDE
[OVERRIDE ...]`, split on spaces); all arms share a stage cache under `--out`, so the teacher is trained once
and every seed's baseline once (its key holds the student, its input and its label share, not the method).
The table (written between `<!-- benchmark:<name>:start/end -->` in `--markdown`) has the teacher, the
baseline and one row per arm: test top-1 as mean ± sample std over seeds, and the paired difference to the
baseline of the same seed (mean ± std, and on how many seeds the arm is ahead). `scripts/benchmark.py` sweeps
distillation terms; this script sweeps whole configurations.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kd_lightning.markdown_sections import write_marked_section


def parse_arm(text: str) -> tuple[str, list[str]]:
    name, separator, overrides = text.partition("=")
    if not separator or not name.strip():
        raise SystemExit(f"--arm {text!r}: write NAME=OVERRIDE [OVERRIDE ...]")
    return name.strip(), shlex.split(overrides)


def slug(name: str) -> str:
    """A directory name Hydra's override grammar accepts (no brackets, commas or spaces)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")


def run_arm(name: str, overrides: list[str], common: list[str], seeds: str, out: Path, threads: int,
            cache: Path) -> float:
    directory = out / slug(name)
    command = [sys.executable, "-m", "kd_lightning.train", "-m", f"seed={seeds}", *common, *overrides,
               f"hydra.sweep.dir={directory}", f"paths.cache_dir={cache}", "logger=none", "callbacks=none",
               "trainer.enable_progress_bar=false", f"torch_threads={threads}"]
    started = time.time()
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(out / f"{directory.name}.log", "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    if result.returncode != 0:
        print(f"arm {name!r} ended with exit code {result.returncode}; see {out / (directory.name + '.log')}")
    return time.time() - started


def arm_results(directory: Path) -> dict[int, dict]:
    """seed → results.json of the arm's jobs (the newest per seed)."""
    found: dict[int, dict] = {}
    for path in sorted(directory.glob("*/results.json"), key=lambda p: p.stat().st_mtime):
        results = json.loads(path.read_text())
        seeds = [text.split("=", 1)[1] for text in results.get("overrides", []) if text.startswith("seed=")]
        found[int(seeds[-1]) if seeds else 0] = results
    return found


def percent(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    spread = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {spread:.2f}"


def table(arms: list[tuple[str, list[str]]], out: Path) -> str:
    by_arm = {name: arm_results(out / slug(name)) for name, _ in arms}
    rows = ["| row | test top-1 (%) | Δ vs baseline, paired (pp) | ahead on | seeds |", "| --- | --- | --- | --- | --- |"]
    teachers = [r["teacher"]["metrics"]["test/acc"] for results in by_arm.values() for r in results.values()
                if "teacher" in r]
    if teachers:
        rows.append(f"| teacher | {100 * teachers[0]:.2f} | – | – | trained once |")
    baselines: dict[tuple[str, int], float] = {}
    for name, results in by_arm.items():
        for seed, r in results.items():
            if "baseline" in r:
                baselines[(name, seed)] = r["baseline"]["test/acc"]
    first = {seed: value for (_, seed), value in sorted(baselines.items())}
    rows.append(f"| student alone (baseline) | {percent(list(first.values()))} | – | – | {len(first)} |")
    for name, _ in arms:
        results = by_arm[name]
        accuracies = {seed: r["student_metrics"]["test/acc"] for seed, r in results.items()}
        deltas = [accuracies[seed] - baselines[(name, seed)] for seed in accuracies if (name, seed) in baselines]
        ahead = sum(delta > 0 for delta in deltas)
        delta_text = percent(deltas) if deltas else "–"
        rows.append(f"| {name} | {percent(list(accuracies.values()))} | {delta_text} | "
                    f"{ahead}/{len(deltas) if deltas else 0} | {len(accuracies)} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="section name in --markdown")
    parser.add_argument("--arm", action="append", required=True, help="NAME=OVERRIDE [OVERRIDE ...]")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--jobs", type=int, default=1, help="arms run at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--out", type=Path, help="default: outputs/arms/<name>")
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--cache", type=Path, help="stage cache (default: <out>/cache); share it across benchmarks "
                                                   "whose teachers are the same")
    parser.add_argument("--render-only", action="store_true", help="only re-tabulate a finished --out")
    parser.add_argument("common", nargs="*", help="Hydra overrides for every arm, after --")
    args = parser.parse_args()
    arms = [parse_arm(text) for text in args.arm]
    out = args.out or Path("outputs/arms") / args.name
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if not args.render_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda arm: run_arm(arm[0], arm[1], args.common, args.seeds, out, args.threads,
                                              args.cache or out / "cache"), arms))
    minutes = (time.time() - started) / 60
    command = "python scripts/arms_benchmark.py --name {} --seeds {} --jobs {} {} -- {}".format(
        args.name, args.seeds, args.jobs, " ".join(f"--arm {shlex.quote(text)}" for text in args.arm),
        " ".join(shlex.quote(text) for text in args.common))
    body = (f"## {args.name}\n\n```bash\n{command}\n```\n\n{datetime.date.today()}; {os.cpu_count()} CPUs "
            f"({platform.machine()}), no GPU; {'re-tabulated' if args.render_only else f'wall time {minutes:.1f} min'}."
            f"\n\n{table(arms, out)}\n")
    write_marked_section(args.markdown, args.name, body)
    print(body)


if __name__ == "__main__":
    main()
