"""Sweep distillation methods × seeds with `kd-train -m`, then tabulate and plot test top-1.

    python scripts/benchmark.py --name digits --methods kd,at,"[kd,crd]" --seeds 0,1,2 --out bench/digits \\
        --set data=digits --term-set crd:distill.crd.nce_k=256 --term-set kd+crd:scheme.ce_weight=1.0 \
        --term-set kd+crd:distill.kd.weight=1.0 -- trainer.max_epochs=5

A composition whose terms' recipes disagree on the CE weight (kd's 0.1, crd's 1) is refused unless
`scheme.ce_weight` is set, as above (CRD+KD: CE 1, KD 1, CRD 0.8; `distill=crd_kd` is the same recipe).

Methods that take the same `--term-set` overrides share one Hydra multirun (`distill=kd,at,[kd,crd]
seed=0,1,2 baseline=false`); a multirun that fails is retried method by method, so one broken method (a
ConfigError ends the whole process) cannot take the others with it. The student baselines are one more
multirun (`scheme=supervised seed=...`). All share the `--set`/`--` overrides and a teacher cache inside
`--out`: the first job trains the teacher, every later one loads it. The table (mean ± sample std over seeds, Δ to the
baseline mean) goes between `<!-- benchmark:<name>:start/end -->` in `--markdown`, the bar chart to
`<plot-dir>/<name>.png`. `--render-only DIR` redraws both from a finished sweep.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


from kd_lightning.markdown_sections import write_marked_section
from kd_lightning.sweeps.report import job_results, mean_std, plot as plot_bars

BASELINE = "baseline"


def split_top_level(text: str) -> list[str]:
    """`kd,at,[kd,crd]` → `['kd', 'at', '[kd,crd]']`: commas inside brackets belong to a combination."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    items.append(current.strip())
    return [item for item in items if item]


def terms_of(method: str) -> list[str]:
    return split_top_level(method.strip("[]"))


def label_of(method: str) -> str:
    return "+".join(terms_of(method))


def sweep_commands(args: argparse.Namespace, out: Path, methods: list[str] | None = None,
                   tag: str = "") -> list[tuple[list[str], list[str]]]:
    """(method labels, kd-train arguments) per multirun: methods that take the same per-term overrides share
    one `distill=a,b,[c,d]` sweep; the baselines (unless `methods` is given) are the last one."""
    shared = [*args.set, *args.overrides, f"paths.cache_dir={out / 'cache'}"]
    seeds = f"seed={args.seeds}"
    groups: dict[tuple[str, ...], list[str]] = {}
    for method in split_top_level(args.methods) if methods is None else methods:
        names = {*terms_of(method), label_of(method)}
        groups.setdefault(tuple(value for key, value in args.term_set if key in names), []).append(method)
    runs = [(members, [f"distill={','.join(members)}", seeds, "baseline=false", *shared, *extra])
            for extra, members in groups.items()]
    if methods is None:
        runs.append(([BASELINE], ["scheme=supervised", seeds, *shared]))
    return [([label_of(m) for m in members],
             ["-m", *overrides, f"hydra.sweep.dir={out / 'sweeps' / (slug(label_of(members[0])) + tag)}"])
            for members, overrides in runs]


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label)


def machine() -> str:
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    gpus = [line for line in listing.splitlines() if line.startswith("GPU")]  # "GPU 0: <name> (UUID: ...)"
    names = sorted({line.split(":")[1].split("(")[0].strip() for line in gpus})
    return (f"{os.cpu_count()} CPUs ({platform.machine()}), "
            + (f"{len(gpus)} GPU(s): {', '.join(names)}" if gpus else "no GPU"))


def run_sweeps(args: argparse.Namespace, out: Path, argv: list[str]) -> dict[str, Any]:
    """Every multirun; a failed one (a ConfigError ends its whole process) is retried method by method, so
    only the methods that fail on their own are missing from the table."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "name": args.name, "command": "python scripts/benchmark.py " + shlex.join(argv),
        "date": datetime.date.today().isoformat(), "machine": machine(),
        "seeds": len(args.seeds.split(",")), "runs": [], "term_overrides": [f"{t}: {v}" for t, v in args.term_set],
    }
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
                              if args.threads else {}))
    start = time.monotonic()

    def launch(labels: list[str], overrides: list[str]) -> int:
        log_file = out / "logs" / f"{slug(labels[0])}{'' if len(labels) == 1 else '-group'}.log"
        run_start = time.monotonic()
        with open(log_file, "w") as log:
            rc = subprocess.run([sys.executable, "-m", "kd_lightning.train", *overrides], stdout=log,
                                stderr=subprocess.STDOUT, env=env).returncode
        meta["runs"].append({"labels": labels, "rc": rc, "log": str(log_file.relative_to(out)),
                             "wall_s": round(time.monotonic() - run_start, 1)})
        print(f"[benchmark] {','.join(labels)}: exit {rc}, {meta['runs'][-1]['wall_s']} s", flush=True)
        return rc

    by_label = {label_of(m): m for m in split_top_level(args.methods)}
    for labels, overrides in sweep_commands(args, out):
        if launch(labels, overrides) != 0 and len(labels) > 1:
            done = collect(out)[0]
            for label in labels:
                if len(done.get(label, [])) < meta["seeds"]:
                    launch(*sweep_commands(args, out, [by_label[label]], tag="-alone")[0])
    meta["wall_s"] = round(time.monotonic() - start, 1)
    (out / "benchmark.json").write_text(json.dumps(meta, indent=2))
    return meta


def method_of(overrides: list[str]) -> str:
    values = dict(item.split("=", 1) for item in overrides if "=" in item)
    if values.get("scheme") == "supervised":
        return BASELINE
    return label_of(values.get("distill", "kd"))


def by_seed(out: Path) -> tuple[dict[str, dict[str, float]], list[float]]:
    """Test top-1 (%) per method label and seed (the newest job per seed, should a retry have rerun one), and the
    teacher's (one value per job that reports one); jobs read as kd-report reads them."""
    latest: dict[str, dict[str, float]] = {}
    teacher: list[float] = []
    for overrides, results in job_results(out / "sweeps"):
        seed = dict(item.split("=", 1) for item in overrides if "=" in item).get("seed", "0")
        latest.setdefault(method_of(overrides), {})[seed] = 100 * results["student_metrics"]["test/acc"]
        if "teacher" in results:
            teacher.append(100 * results["teacher"]["metrics"]["test/acc"])
    return latest, teacher


def collect(out: Path) -> tuple[dict[str, list[float]], list[float]]:
    """Test top-1 (%) per method label, one value per seed, and the teacher's."""
    latest, teacher = by_seed(out)
    return {label: list(seeds.values()) for label, seeds in latest.items()}, teacher


def paired_delta(method: dict[str, float], baseline: dict[str, float]) -> str:
    """Seed-by-seed difference to the baseline trained on the same seed: mean ± std, and on how many seeds the
    method is ahead. The unpaired Δ mixes both rows' seed spreads; pairing removes what the seed does to both."""
    seeds = sorted(set(method) & set(baseline), key=str)
    if not seeds:
        return "–"
    deltas = [method[seed] - baseline[seed] for seed in seeds]
    mean, std = mean_std(deltas)
    ahead = sum(delta > 0 for delta in deltas)
    return f"{mean:+.2f}" + (f" ± {std:.2f}" if std is not None else "") + f" ({ahead}/{len(deltas)} ahead)"


def failure(out: Path, run: dict[str, Any]) -> str:
    """The line of a run's log that says why it failed: kd-train's own error, else the exception, else Hydra's."""
    lines = [line.strip() for line in (out / run["log"]).read_text(errors="replace").splitlines() if line.strip()]
    picks = ([line for line in lines if "kd-train: error:" in line][-1:]
             or [line for line in lines if re.match(r"[\w.]*(Error|Exception)\b", line)][-1:]
             or [line for line in lines if re.search(r"error|could not", line, re.I)
                 and "HYDRA_FULL_ERROR" not in line][:1]
             or lines[-1:] or ["no output"])
    return picks[0][:200].replace("|", "/")


def render_table(out: Path, meta: dict[str, Any]) -> tuple[str, list[tuple[str, float, float]]]:
    accs, teacher = collect(out)
    seeds = by_seed(out)[0]
    base = mean_std(accs[BASELINE])[0] if accs.get(BASELINE) else None
    rows = ["| method | test top-1 (%) | Δ vs baseline (pp) | paired Δ, same seed (pp) | seeds |",
            "| --- | --- | --- | --- | --- |"]
    bars = []
    if teacher:
        rows.append(f"| teacher (trained once, cached) | {teacher[0]:.2f} | {teacher[0] - base:+.2f} | – | – |"
                    if base is not None else f"| teacher | {teacher[0]:.2f} | – | – | – |")
    ranked = sorted((label for label in accs if label != BASELINE), key=lambda k: -mean_std(accs[k])[0])
    for label in ([BASELINE] if base is not None else []) + ranked:
        mean, std = mean_std(accs[label])
        delta = "–" if label == BASELINE or base is None else f"{mean - base:+.2f}"
        name = "student baseline (CE only)" if label == BASELINE else f"`{label}`"
        paired = "–" if label == BASELINE or base is None else paired_delta(seeds[label], seeds[BASELINE])
        accuracy = f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"
        rows.append(f"| {name} | {accuracy} | {delta} | {paired} | {len(accs[label])} |")
        if label != BASELINE:
            bars.append((label, mean, std or 0.0))
    last_try = {label: run for run in meta.get("runs", []) for label in run["labels"]}
    for label, run in last_try.items():
        if run["rc"] != 0 and len(accs.get(label, [])) < meta["seeds"]:
            rows.append(f"| `{label}` | failed (exit {run['rc']}): {failure(out, run)} | – | – | "
                        f"{len(accs.get(label, []))} |")
    return "\n".join(rows), bars


def plot(bars: list[tuple[str, float, float]], base: float | None, teacher: float | None, path: Path,
         title: str) -> None:
    """kd-report's bar chart, best method on top, with the shared baseline and the teacher as lines."""
    lines = {name: value for name, value in (("baseline", base), ("teacher", teacher)) if value is not None}
    plot_bars([(label, mean, std, None) for label, mean, std in sorted(bars, key=lambda bar: -bar[1])], lines,
              path, title)


def render(out: Path, markdown: Path, plot_dir: Path) -> str:
    meta_file = out / "benchmark.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {"name": out.name, "runs": []}
    name = meta["name"]
    table, bars = render_table(out, meta)
    accs, teacher = collect(out)
    base = mean_std(accs[BASELINE])[0] if accs.get(BASELINE) else None
    png = plot_dir / f"{name}.png"
    plot(bars, base, teacher[0] if teacher else None, png, name)
    wall = meta.get("wall_s")
    jobs = sum(len(values) for values in accs.values())
    lines = [f"## {name}", "", "```bash", meta.get("command", "(command not recorded)"), "```", "",
             f"{meta.get('date', '?')}; {meta.get('machine', '?')}; {jobs} jobs; total wall time "
             + (f"{wall / 60:.1f} min." if wall is not None else "not recorded.")]
    if meta.get("term_overrides"):
        lines += ["", "Per-term overrides (every run containing the term): "
                  + "; ".join(f"`{item}`" for item in meta["term_overrides"]) + "."]
    lines += ["", table, "", f"![{name}]({os.path.relpath(png, markdown.parent)})"]
    return write_marked_section(markdown, name, "\n".join(lines))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="benchmark", help="section and plot name (default: benchmark)")
    parser.add_argument("--methods", default="kd", help='distill values, e.g. kd,at,"[kd,crd]"')
    parser.add_argument("--seeds", default="0,1,2", help="seed sweep (default: 0,1,2)")
    parser.add_argument("--out", type=Path, help="sweep directory (default: outputs/benchmarks/<name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override shared by every job (repeatable); anything after -- is shared too")
    parser.add_argument("--term-set", action="append", default=[], metavar="TERM:KEY=VALUE",
                        help="override for every run whose distill contains TERM (ab:distill.ab.init_epochs=2) or "
                        "is the combination TERM (kd+crd:distill.kd.weight=1)")
    parser.add_argument("--threads", type=int, help="torch threads per job (OMP_NUM_THREADS); on a shared CPU 1 "
                        "can be several times faster than the default")
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"), help="file to write the table into")
    parser.add_argument("--plot-dir", type=Path, default=Path("docs/benchmarks"), help="where <name>.png goes")
    parser.add_argument("--render-only", type=Path, metavar="DIR", help="only re-render the sweep in DIR")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1:]
    try:
        args.term_set = [tuple(item.split(":", 1)) for item in args.term_set]
        assert all("=" in value for _, value in args.term_set)
    except (ValueError, AssertionError):
        parser.error("--term-set takes TERM:KEY=VALUE, e.g. --term-set ab:distill.ab.init_epochs=2")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render_only:
        print(render(args.render_only.resolve(), args.markdown, args.plot_dir))
        return 0
    out = (args.out or Path("outputs") / "benchmarks" / args.name).resolve()
    meta = run_sweeps(args, out, argv)
    print(render(out, args.markdown, args.plot_dir))
    accs = collect(out)[0]
    missing = [label for run in meta["runs"] for label in run["labels"] if len(accs.get(label, [])) < meta["seeds"]]
    if missing:
        print(f"[benchmark] no result for every seed of: {', '.join(dict.fromkeys(missing))} (logs in {out / 'logs'})",
              file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
