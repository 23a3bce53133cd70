"""How large each weighted loss of a distilled stage is next to the cross-entropy, and how much of the student's
gradient it owns, on the first training batches: the measurement behind a term that drowns CE at its published
weight (AT's 1000 on the digits' small maps, BENCHMARKS.md `digits_terms`).

    python scripts/loss_share.py --batches 20 -- distill=[at] paths.cache_dir=bench/terms/cache

Composes `train.yaml` with the overrides after `--`, loads (or trains and caches) every stage before the last
exactly as `kd-train` would, builds the last stage with a freshly initialised student (`--student-from baseline`
starts it from the trained baseline instead: the share at a solution CE alone found) and, without stepping,
evaluates each weighted loss of the stage's `training_losses` and the L2 norm of its gradient on the student's
parameters over `--batches` training batches. Prints a markdown table (mean over batches) and the spatial size of
every tapped 4-d feature map the terms read.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from kd_lightning.pipeline import (build_stage_module, construct, recipe_key, run_stage, stage_config, stage_recipe,
                                   teacher_arguments)
from kd_lightning.schemes.base import unpack_batch
from kd_lightning.stages import plan_stages

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def measure(overrides: list[str], batches: int, student_from: str | None) -> tuple[dict[str, dict], dict, str]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    datamodule = construct(cfg.data)
    stages = plan_stages(cfg)
    products, keys = {}, {}
    for stage in stages[:-1]:  # teachers and baselines: from the stage cache when a run has trained them
        stage_cfg = stage_config(cfg, stage)
        keys[stage.name] = recipe_key(stage_recipe(stage_cfg, stage, keys))
        products[stage.name], _, _ = run_stage(stage_cfg, stage, datamodule, products, keys[stage.name], None)
    last = stages[-1]
    L.seed_everything(last.seed, workers=True)
    module = build_stage_module(stage_config(cfg, last), last, datamodule, teacher_arguments(last, products))
    if student_from:
        module.student.load_state_dict(next(iter(products[student_from].values())).state_dict())
    module.train()
    datamodule.setup("fit")
    params = [p for p in module.student.parameters() if p.requires_grad]
    rows: dict[str, dict[str, list[float]]] = {}
    maps: dict[str, tuple[int, ...]] = {}
    for _, batch in zip(range(batches), datamodule.train_dataloader()):
        images, targets, indices = unpack_batch(batch)[:3]
        losses = module.training_losses(images, targets, indices)
        for side in ("student", "teacher"):
            features = getattr(getattr(module, f"{side}_taps", None), "features", None) or {}
            maps.update({f"{side} {name}": tuple(value.shape[1:]) for name, value in features.items()
                         if value.dim() == 4})
        for name, loss in losses.items():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None) + 0.0)
            rows.setdefault(name, {"value": [], "grad": []})
            rows[name]["value"].append(float(loss.detach()))
            rows[name]["grad"].append(float(norm))
        module.release_features()
    return rows, maps, module.loss_summary()


def render(rows: dict[str, dict[str, list[float]]], maps: dict, summary: str, batches: int) -> str:
    total = {name: statistics.mean(row["grad"]) for name, row in rows.items()}
    ce = total.get("ce")
    lines = [f"{summary}; {batches} batches, no step taken", "",
             "| loss (weighted) | value | ‖∇ student‖ | ‖∇‖ / ‖∇ CE‖ |", "| --- | --- | --- | --- |"]
    for name, row in rows.items():
        ratio = f"{total[name] / ce:.1f}" if ce else "–"
        lines.append(f"| {name} | {statistics.mean(row['value']):.4g} | {total[name]:.4g} | {ratio} |")
    if maps:
        lines += ["", "tapped maps (C, H, W): " + ", ".join(f"{name} {shape}" for name, shape in sorted(maps.items()))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20, help="training batches averaged over (default 20)")
    parser.add_argument("--student-from", metavar="STAGE", help="start the student from this earlier stage's "
                        "trained network (e.g. baseline) instead of a fresh initialisation")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv[:split])
    torch.set_num_threads(args.threads)
    rows, maps, summary = measure(argv[split + 1:], args.batches, args.student_from)
    print(render(rows, maps, summary, args.batches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
