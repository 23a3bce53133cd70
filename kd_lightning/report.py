"""The closing table of a run: every stage's test accuracy, with the size that KD trades it for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kd_lightning.data.inputs import select

if TYPE_CHECKING:
    from kd_lightning.stages import Stage

Row = tuple[str, str, Mapping[str, float], Mapping[str, int]]
# Below this many times chance (1/K) a network predicts nearly one class for every input.
COLLAPSE_FACTOR = 1.5
# A distilled network this far (accuracy, as a fraction) below the same network trained with CE alone on the same
# seed was held back by its distillation, not taught: seed noise on the embedded digits is about 1 point.
BASELINE_GAP = 0.10


def network_size(model: nn.Module, example_input: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Parameters and FLOPs of one forward pass per image (torch's FlopCounterMode: 2 FLOPs per
    multiply-accumulate of matmuls and convolutions), measured in eval mode on one example image."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(select(example_input, slice(0, 1)))  # a network of named inputs picks its own
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


def baseline_gap_warning(stage: str, metrics: Mapping[str, float], baseline: Mapping[str, float],
                         terms: Mapping[str, Mapping[str, Any]], loss: str | None = None) -> str | None:
    """A warning when a distilled stage ends more than `BASELINE_GAP` below the run's own baseline (the same
    network, seed and recipe without distillation), on the split both report (test, else validation). Such a
    stage sits above chance, so `collapse_warning` stays silent, yet the distillation has cost it accuracy."""
    split = next((split for split in ("test", "val") if f"{split}/acc" in metrics and f"{split}/acc" in baseline),
                 None)
    if split is None or baseline[f"{split}/acc"] - metrics[f"{split}/acc"] <= BASELINE_GAP:
        return None
    accuracy, reference = 100 * metrics[f"{split}/acc"], 100 * baseline[f"{split}/acc"]
    named = ", ".join(f"{name} at weight {term['weight']:g}" if isinstance(term.get("weight"), (int, float))
                      else name for name, term in terms.items())
    knobs = " / ".join(f"distill.{name}.weight" for name in terms) or "the scheme's distillation weights"
    return (f"Stage {stage!r} ended at {accuracy:.2f}% {split} accuracy, {reference - accuracy:.1f} points below the "
            f"same run's baseline ({reference:.2f}%, the same network trained with CE alone): its distillation "
            f"({named or 'the scheme'}{f'; {loss}' if loss else ''}) held it back. A published weight belongs to "
            f"its paper's data and networks: the feature terms' weights were set on CIFAR networks' 32x32 maps and "
            f"feature scales, and on other inputs the term can drown the cross-entropy (AT's loss is a mean over "
            f"map positions of unit-norm maps: for the same mismatch, 8x8 maps give it 16x the value of 32x32 "
            f"ones). Usual fix: lower {knobs} (10-100x), choosing it on held-out validation data "
            f"(data.val_fraction > 0, never the test split), and compare with the baseline again.")


def stage_warning(stage: Stage, records: Mapping[str, Mapping[str, Any]], num_classes: int) -> str | None:
    """Every warning about a finished stage as one paragraph, or None: near chance (`collapse_warning`), and for
    a distilled stage far below the baseline stage of the same run on the same networks (`baseline_gap_warning`)."""
    record = records[stage.name]
    if stage.scheme.get("ce_weight") == 0 and stage.distill:
        # A label-free stage (supervision transfer's pre-training) trains features, not its classifier: its
        # accuracy is not what it is for; the stage that fine-tunes it is judged instead.
        return None
    warnings = [collapse_warning(stage.name, record["metrics"], num_classes)]
    baseline = records.get("baseline")
    # Only a stage training the baseline's own networks compares with it (not a TAKD assistant, not DML's peers).
    if (baseline is not None and stage.name != "baseline" and (stage.distill or stage.teachers)
            and baseline.get("models") == record.get("models")):
        warnings.append(baseline_gap_warning(stage.name, record["metrics"], baseline["metrics"], stage.distill or {},
                                             record.get("loss")))
    return " ".join(warning for warning in warnings if warning) or None


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e6:.3g}M" if value >= 1e6 else f"{value / 1e3:.3g}k" if value >= 1e3 else str(value)
