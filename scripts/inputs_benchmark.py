"""What named inputs cost per KD step (CPU or GPU), measured in one process with the arms interleaved per round.

    python scripts/inputs_benchmark.py --rounds 5 --steps 30 --clock cpu -- data.augment=true data.batch_size=256

Arms, each the Lightning fit of `Offline` KD (scripts/throughput.py's `measure`, convnet_large → convnet_tiny on
digits unless the overrides say otherwise), on the DataLoader path and on the device-resident one:
  * `plain`: no `inputs` set: the batches and the step of a run without named inputs;
  * `named, one input`: every role named on the data's one input (`inputs.teacher=image inputs.student=image`):
    dict batches and the networks' input-picking hooks, no second view;
  * `second view`: the teacher reads its own augmentation draw (`inputs.views.teacher_view={draw: own}`): one
    more crop (and normalisation) per sample, the mean teacher's and KDCL's case.
Each round times every arm once, in a rotating order, so a change of machine load reaches all arms alike; the
ratio of each arm to `plain` of its round is reported as the median and range over rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from pathlib import Path

spec = importlib.util.spec_from_file_location("throughput", Path(__file__).with_name("throughput.py"))
throughput = importlib.util.module_from_spec(spec)
spec.loader.exec_module(throughput)  # type: ignore[union-attr]

ARMS = {
    "plain": [],
    "named, one input": ["inputs.teacher=image", "inputs.student=image"],
    "second view": ["+inputs.views.teacher_view={draw:own}", "inputs.teacher=teacher_view"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--resident", nargs="+", default=["false", "true"], help="data.device_resident values")
    parser.add_argument("--clock", choices=sorted(throughput.CLOCKS), default="wall",
                        help="wall, or cpu: this process's CPU time, on a CPU other jobs share")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = parser.parse_args()
    throughput.CLOCK[0] = throughput.CLOCKS[args.clock]
    print("| path | arm | images/s (median) | ratio to plain, median (range over rounds) |")
    print("| --- | --- | --- | --- |")
    for resident in args.resident:
        speeds: dict[str, list[float]] = {arm: [] for arm in ARMS}
        names = list(ARMS)
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for arm in order:
                cfg = throughput.compose_cfg([*args.overrides, *ARMS[arm], "trainer=cpu"], "32-true",
                                             int(_batch_size(args.overrides)), resident == "true", False)
                speed, *_ = throughput.measure(cfg, args.steps, args.warmup)
                speeds[arm].append(speed)
        for arm in names:
            ratios = [plain / speed for plain, speed in zip(speeds["plain"], speeds[arm])]  # time ratio
            print(f"| {'device' if resident == 'true' else 'DataLoader'} | {arm} | {statistics.median(speeds[arm]):.0f} "
                  f"| {statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) |")


def _batch_size(overrides: list[str]) -> int:
    found = [text.split("=", 1)[1] for text in overrides if text.startswith("data.batch_size=")]
    return int(found[-1]) if found else 64


if __name__ == "__main__":
    main()
