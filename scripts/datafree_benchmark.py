"""Data-free methods side by side: one teacher per data set, every method's student, both floors, wall time.

    python scripts/datafree_benchmark.py --out bench/datafree --markdown BENCHMARKS.md

Per data set (DATASETS) a cheap first job trains and caches the LeNet-5 teacher on real data; then one
`kd-train` job per method (METHODS) distils LeNet-5-half from that same cached teacher without a training
image, on the same machine, one job at a time, so the wall times compare. Rows: teacher-relative accuracy
(student test top-1 / the run's own teacher's), the wall time of the job (start-up, loading the cached
teacher and the test evaluation included; the warm-up job's time is that overhead). Adding a method is one
line in METHODS. `--seeds 0,1,2` repeats the methods per run seed (`seed=`: the student's and generator's
initialisation and noise; the teacher has its own `teacher.seed`, so every seed distils from the same cached
teacher) and the table adds each method's mean ± std over its seeds. Rows accumulate in `<out>/rows.json`
across invocations with the same `--out` (a rerun of a method and seed replaces its row). The section goes
between `<!-- benchmark:datafree:start/end -->` in `--markdown`.
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
from pathlib import Path

from kd_lightning.markdown_sections import write_marked_section

MARK = "datafree"
BN_PAIR = ["teacher=convnet_large", "student=convnet_tiny"]
CLASS_PRIORS = ["scheme.class_priors.one_hot=1", "scheme.class_priors.information_entropy=5"]
# MB-DFKD's memory: earlier generated images (batch/8 every 10 student steps) replayed in every student batch.
REPLAY = ["scheme.replay.capacity=8192"]
# (label, kd-train overrides). The floors show what a method adds over no synthesis and over a random generator.
METHODS: list[tuple[str, list[str]]] = [
    ("DAFL", ["scheme=dafl", "scheme.activation_tap=stage3"]),
    ("DFAD", ["scheme=dfad"]),
    # The generator's loss with DAFL's one-hot and information-entropy priors (DAFL's MNIST weights): the
    # reference DFAD collapses on Fashion-MNIST (BENCHMARKS.md `datafree`, "Tried").
    ("DFAD + class priors", ["scheme=dfad", *CLASS_PRIORS]),
    ("DFAD + class priors + replay", ["scheme=dfad", *CLASS_PRIORS, *REPLAY]),
    ("ZSKT", ["scheme=zskt"]),
    ("ZSKT + class priors", ["scheme=zskt", *CLASS_PRIORS]),
    ("ZSKT + replay", ["scheme=zskt", *REPLAY]),
    # More generator steps per student step (ZSKT's 10 is its CIFAR-10 / SVHN setting; DFAD's MNIST recipe takes 5).
    ("ZSKT, 5 student steps per generator step", ["scheme=zskt", "scheme.student_steps=5"]),
    ("ZSKT, 5 student steps per generator step + replay", ["scheme=zskt", "scheme.student_steps=5", *REPLAY]),
    # MB-DFKD adds batch/8 replayed images (16 of 128); twice that weighs the earlier generators more.
    ("ZSKT, 5 student steps per generator step + replay of 32 images per batch",
     ["scheme=zskt", "scheme.student_steps=5", *REPLAY, "scheme.replay.batch_size=32"]),
    ("ZSKT, 2 student steps per generator step", ["scheme=zskt", "scheme.student_steps=2"]),
    ("floor: N(0,1) inputs", ["scheme=datafree_noise"]),
    ("floor: untrained generator", ["scheme=dafl", "scheme.activation_tap=stage3", "scheme.train_generator=false"]),
    # BN-statistics inversion needs a teacher with BatchNorm (LeNet-5 has none): these rows bring their own, trained
    # (and cached) by the first of them, so that row's wall time includes the teacher. Synthesis cut for a CPU budget.
    ("DeepInversion (convnet_large teacher)", ["scheme=deep_inversion", *BN_PAIR, "scheme.steps_per_round=50",
                                               "scheme.student_crop_padding=1", "scheme.synthesis.batch_size=64",
                                               "scheme.synthesis.iterations=100", "scheme.synthesis.lr=0.1"]),
    ("Fast-Datafree (convnet_large teacher)", ["scheme=fast_datafree", *BN_PAIR, "scheme.steps_per_round=5",
                                               "scheme.student_crop_padding=1", "scheme.synthesis.batch_size=64",
                                               "scheme.synthesis.warmup_rounds=5", "scheme.synthesis.crop_padding=1"]),
]
# Data set → overrides of every job on it (teacher recipe and the student's budget are shared by all methods).
DATASETS: dict[str, list[str]] = {
    "fashion_mnist": ["data=fashion_mnist", "data.num_workers=0", "teacher.max_epochs=3", "optimizer.lr=0.05"],
    "digits": ["data=digits", "teacher.max_epochs=30", "optimizer.lr=0.05"],
}
COMMON = ["teacher=lenet5", "student=lenet5_half", "baseline=false", "logger=none", "callbacks=none",
          "trainer.enable_progress_bar=false"]


def run_job(name: str, overrides: list[str], args: argparse.Namespace, out: Path, last: list[str] = ()) -> dict:
    """One kd-train job; `last` comes after the command line's overrides, so it wins over them."""
    # A later override replaces an earlier one of the same key (a method's teacher= over the shared one).
    overrides = [o for i, o in enumerate(overrides)
                 if o.split("=")[0] not in {later.split("=")[0] for later in overrides[i + 1:]}]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    command = [sys.executable, "-m", "kd_lightning.train", *overrides, f"paths.cache_dir={out / 'cache'}",
               f"hydra.run.dir={out / 'runs' / name}", *args.overrides, *last]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(out / "logs" / f"{name}.log", "w") as log:
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = round(time.monotonic() - start, 1)
    print(f"[datafree] {name}: exit {rc}, {wall} s", flush=True)
    results = out / "runs" / name / "results.json"
    record = json.loads(results.read_text()) if rc == 0 and results.is_file() else {}
    return {"name": name, "rc": rc, "wall_s": wall, "command": shlex.join(command[3:]), "results": record}


def accuracy(record: dict, stage: str, metric: str = "test/acc") -> float | None:
    value = record.get("results", {}).get("stages", {}).get(stage, {}).get("metrics", {}).get(metric)
    return None if value is None else 100 * float(value)


def held_out_accuracy(record: dict, stage: str) -> float | None:
    """The stage's `val/acc` when the run held a validation split out of the training set, else None."""
    fractions = [part.split("=", 1)[1] for part in shlex.split(record.get("command", ""))
                 if part.lstrip("+").startswith("data.val_fraction=")]
    held_out = bool(fractions) and float(fractions[-1]) > 0
    return accuracy(record, stage, "val/acc") if held_out else None


def run_seed(command: str) -> int:
    """The job's `seed=` (the last one on its command line wins, as in Hydra); 0, train.yaml's, without one."""
    seeds = [part.split("=", 1)[1] for part in shlex.split(command) if part.startswith("seed=")]
    return int(seeds[-1]) if seeds else 0


def row_key(row: dict) -> tuple:
    return row["data"], row["method"], row.get("seed", 0)  # rows from before --seeds ran seed 0


def merged_rows(store: Path, rows: list[dict]) -> list[dict]:
    """This invocation's rows over those earlier ones left in `store` (same `--out`: same cached teacher), so
    methods run in separate invocations (one per core, or added later) form one table; a rerun replaces its row."""
    earlier = json.loads(store.read_text()) if store.is_file() else []
    fresh = {row_key(row) for row in rows}
    merged = [row for row in earlier if row_key(row) not in fresh] + rows
    order = [label for label, _ in METHODS]
    merged.sort(key=lambda row: (row["data"], order.index(row["method"]) if row["method"] in order else -1,
                                 row.get("seed", 0)))
    store.write_text(json.dumps(merged, indent=1))
    return merged


def render(rows: list[dict], meta: dict, section: str = MARK) -> str:
    # Every invocation whose rows the table holds, in order (rows merged from earlier ones keep theirs).
    commands = list(dict.fromkeys(row.get("invocation", meta["command"]) for row in rows))
    lines = [f"## {section}", "", "```bash", *commands, "```", "", meta["note"], "",
             "| data | method | seed | teacher acc (%) | student val acc (%) | student acc (%) | ratio | wall (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        teacher, student, val = row["teacher"], row["student"], row.get("val")
        ratio = f"{student / teacher:.3f}" if teacher and student is not None else "–"
        shown = f"{student:.2f}" if student is not None else ("–" if row["rc"] == 0 else f"failed (exit {row['rc']})")
        # "–" without a held-out split (data.val_fraction=0 validates on the test split: not a selection metric).
        held_out = f"{val:.2f}" if val is not None else "–"
        lines.append(f"| {row['data']} | {row['method']} | {row.get('seed', 0)} | "
                     f"{f'{teacher:.2f}' if teacher else '–'} | {held_out} | {shown} | {ratio} | {row['wall_s']} |")
    return "\n".join(lines + seed_summary(rows)) + "\n"


def seed_summary(rows: list[dict]) -> list[str]:
    """Mean ± sample std over the seeds of every method that ran more than one: a ranking needs the spread."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row["student"] is not None and row["teacher"]:
            runs.setdefault((row["data"], row["method"]), []).append(row)
    lines = []
    for (data, method), done in runs.items():
        if len(done) < 2:
            continue
        accs = [row["student"] for row in done]
        ratios = [row["student"] / row["teacher"] for row in done]
        lines.append(f"- {data}, {method}: student {statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}%, "
                     f"ratio {statistics.mean(ratios):.3f} ± {statistics.stdev(ratios):.3f} (mean ± std over seeds "
                     f"{', '.join(str(row.get('seed', 0)) for row in done)})")
    return ["", *lines] if lines else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/datafree"))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default=None, help="METHODS labels to run, separated by ';', in this order "
                                                            "(default: all)")
    parser.add_argument("--seeds", default="0", help="run seeds, separated by ',' (one teacher for all)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per job")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--section", default=MARK, help="the BENCHMARKS.md section to write (one per budget: "
                                                         "another --out and --section keep both tables)")
    parser.add_argument("--render-only", action="store_true", help="run no job: write the section from the rows "
                                                                       "earlier invocations left in <out>/rows.json")
    parser.add_argument("overrides", nargs="*", help="kd-train overrides for every job (after --)")
    args = parser.parse_args()
    out = args.out.resolve()
    methods = dict(METHODS)
    chosen = [(label, methods[label]) for label in args.methods.split(";")] if args.methods else METHODS
    rows = []
    for data, seed in [] if args.render_only else [(data, int(seed)) for data in args.datasets.split(",")
                                                   for seed in args.seeds.split(",")]:
        shared = [*COMMON, *DATASETS[data], f"seed={seed}"]
        seeded = f"-seed{seed}" if seed else ""  # seed 0 keeps the run directories of the runs before --seeds
        # Trains and caches the teacher; the scheme's own settings do not enter the teacher's cache key.
        warmup = run_job(f"{data}{seeded}-teacher", [*shared, "scheme=datafree_noise"], args, out,
                         last=["scheme.steps_per_epoch=1", "trainer.max_epochs=1"])
        teacher = accuracy(warmup, "teacher")
        source = warmup["results"].get("stages", {}).get("teacher", {}).get("source", "")
        warmup_label = ("(warm-up: job overhead, cached teacher)" if source.startswith("cache")
                        else "(warm-up: teacher training + job overhead)")
        rows.append({"data": data, "method": warmup_label, "seed": run_seed(warmup["command"]), "teacher": teacher,
                     "student": None, "rc": warmup["rc"], "wall_s": warmup["wall_s"]})
        for label, overrides in chosen:
            slug = label.split(":")[-1].strip().replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
            job = run_job(f"{data}{seeded}-{slug}", [*shared, *overrides], args, out)
            rows.append({"data": data, "method": label, "seed": run_seed(job["command"]),
                         "teacher": accuracy(job, "teacher"),
                         "student": accuracy(job, "student"), "val": held_out_accuracy(job, "student"),
                         "rc": job["rc"], "wall_s": job["wall_s"]})
    meta = {"command": shlex.join(["python", "scripts/datafree_benchmark.py", *sys.argv[1:]]),
            "note": f"{datetime.date.today()}, {os.cpu_count()} CPU cores shared with other jobs, "
                    f"{args.threads} thread(s) per job, one job at a time per invocation."}
    for row in rows:
        row["invocation"] = meta["command"]
    section = render(merged_rows(out / "rows.json", rows), meta, args.section)
    (out / "datafree.md").write_text(section)
    print(section)
    if args.markdown:
        write_marked_section(args.markdown, args.section, section)


if __name__ == "__main__":
    main()
