"""CRD's training step, before and after the hot-path change, at RepDistiller's CIFAR-100 sizes.

    python scripts/crd_step.py                      # B=64, K=16384, M=50000 rows, 100 classes, CPU
    python scripts/crd_step.py --negatives uniform --rows 1281167   # an ImageNet-sized bank

One step = the two embedding heads, the NCE losses against the memory bank, backward, and the bank update,
on random penultimate features (256-d, as resnet8x4/resnet32x4). The implementation before the change is
read from git history (`--before`, the commit preceding it) into a temporary module; each implementation
runs in a fresh process, so its peak memory is its own: the process's resident-set high-water mark
(getrusage ru_maxrss) minus its resident set just before the first step. Both draw the same negatives from
the same seed, so their losses must agree; the script prints the largest relative difference. Prints one
markdown row per implementation: median step time, peak memory above the pre-step resident set.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "fb5652d"  # the last commit with the per-step syncs and gathered rows
CRD_PATH = "kd_lightning/losses/terms/crd.py"


def crd_class(which: str, before: str):
    if which == "after":
        from kd_lightning.losses.terms import CRD

        return CRD
    source = subprocess.run(["git", "show", f"{before}:{CRD_PATH}"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout
    path = Path(tempfile.mkdtemp()) / "crd_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("crd_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CRD


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_worker(args: argparse.Namespace) -> dict:
    import torch

    from kd_lightning.losses.terms import BuildContext, DistillInputs

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    term = crd_class(args.worker, args.before)(nce_k=args.nce_k, negatives=args.negatives)
    labels = torch.arange(args.rows) % args.classes
    term.build(BuildContext(student_shapes={"penultimate": torch.Size([2, 256])},
                            teacher_shapes={"penultimate": torch.Size([2, 256])}, train_size=args.rows,
                            train_targets=labels))
    optimizer = torch.optim.SGD(term.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps + 1):
        indices = torch.randperm(args.rows, generator=generator)[: args.batch]
        features = {"penultimate": torch.randn(args.batch, 256, generator=generator)}
        batches.append(DistillInputs(student_logits=torch.zeros(args.batch, 1), targets=labels[indices],
                                     indices=indices, student_features=features,
                                     teacher_features={"penultimate": torch.randn(args.batch, 256, generator=generator)}))
    before_steps = resident_bytes()
    times, losses = [], []
    for inputs in batches:  # the first step is warm-up: it sets Z and allocates the caches
        start = time.perf_counter()
        parts = term.loss(inputs)
        optimizer.zero_grad(set_to_none=True)
        (parts["student"] + parts["teacher"]).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        losses.append([float(parts["student"]), float(parts["teacher"])])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    return {"step_s": statistics.median(times[1:]), "peak_bytes": peak - before_steps, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--nce-k", type=int, default=16384)
    parser.add_argument("--rows", type=int, default=50000, help="bank rows M (the training-set size)")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--negatives", default="other_class", choices=["other_class", "uniform"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps, after one warm-up step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before", default=BEFORE, help="git revision of the implementation to compare with")
    parser.add_argument("--worker", choices=["before", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    results = {}
    for which in ("before", "after"):
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", which]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        output = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
        results[which] = json.loads(output.strip().splitlines()[-1])
    pairs = zip(sum(results["before"]["losses"], []), sum(results["after"]["losses"], []))
    difference = max(abs(old - new) / max(abs(old), 1e-12) for old, new in pairs)
    print(f"B={args.batch} K={args.nce_k} M={args.rows} negatives={args.negatives} threads={args.threads}; "
          f"losses of both agree to a relative {difference:.1e} over {args.steps + 1} steps\n")
    print("| implementation | step (s) | peak memory above pre-step RSS (MB) |")
    print("|---|---|---|")
    for which, result in results.items():
        print(f"| {which} | {result['step_s']:.3f} | {result['peak_bytes'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
