"""The closing table of a run: every stage's test accuracy, with the size that KD trades it for."""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

Row = tuple[str, str, Mapping[str, float], Mapping[str, int]]
# Below this many times chance (1/K) a network predicts nearly one class for every input.
COLLAPSE_FACTOR = 1.5


def network_size(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Parameters and FLOPs of one forward pass per image (torch's FlopCounterMode: 2 FLOPs per
    multiply-accumulate of matmuls and convolutions), measured in eval mode on one example image."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example_input[:1])
    model.train(was_training)
    return {"params": sum(p.numel() for p in model.parameters()), "flops": int(counter.get_total_flops())}


def format_table(rows: Iterable[Row], title: str = "results", reference_params: int | None = None) -> str:
    """One line per row; `reference_params` (the teacher's) adds each network's parameter ratio to it."""
    rows = list(rows)
    top5 = any("test/acc_top5" in metrics for _, _, metrics, _ in rows)
    header = (["role", "model", "test acc (%)"] + (["top-5 (%)"] if top5 else [])
              + ["params", "MFLOPs/img"] + (["params / teacher"] if reference_params else []))
    lines = [header]
    for role, model, metrics, size in rows:
        line = [role, model, _percent(metrics.get("test/acc"))]
        if top5:
            line.append(_percent(metrics.get("test/acc_top5")))
        line += [_count(size.get("params")), "-" if size.get("flops") is None else f"{size['flops'] / 1e6:.3g}"]
        if reference_params:
            line.append("-" if size.get("params") is None else f"{size['params'] / reference_params:.3f}")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rule = "+".join("-" * (width + 2) for width in widths)
    text = [f"== {title} =="]
    for index, line in enumerate(lines):
        text.append(" | ".join(cell.ljust(width) for cell, width in zip(line, widths)))
        if index == 0:
            text.append(rule)
    return "\n".join(text)


def collapse_warning(stage: str, metrics: Mapping[str, float], num_classes: int) -> str | None:
    """A warning when a stage ends near chance accuracy (its test accuracy, else its validation accuracy):
    such a run finishes without error, its table row is a number like any other, and it is wrong."""
    split = next((split for split in ("test", "val") if f"{split}/acc" in metrics), None)
    if split is None or num_classes < 2 or metrics[f"{split}/acc"] >= COLLAPSE_FACTOR / num_classes:
        return None
    return (f"Stage {stage!r} ended at {100 * metrics[f'{split}/acc']:.2f}% {split} accuracy, chance level for "
            f"{num_classes} classes ({100 / num_classes:.2f}%): its training collapsed to a near-constant "
            f"prediction, and its numbers say nothing about the method. The usual cause is a learning rate too "
            f"large for the loss's gradient scale (KD's T² factor at T=4 on a network without BatchNorm does it "
            f"on Fashion-MNIST at SGD 0.05): lower optimizer.lr (e.g. 5-10x) and compare with the baseline stage.")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.3g}M" if value >= 1e6 else f"{value / 1e3:.3g}k" if value >= 1e3 else str(value)
