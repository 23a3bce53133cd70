"""What feature-map terms share: stage-pair checks, and the student parameters that initialisation stages
(AB, FSP) train."""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms.base import BuildContext
from kd_lightning.taps import INPUT_SUFFIX, declared_taps


def feature_parameters(student: nn.Module) -> list[nn.Parameter]:
    """The student's trainable parameters except its classifier, like RepDistiller's `get_feat_modules`
    (what its AB and FSP initialisation stages train). The classifier is the module whose input is the
    declared `penultimate` tap; a model without one trains all its parameters."""
    penultimate = declared_taps(student).points.get("penultimate", "")
    classifier = penultimate[: -len(INPUT_SUFFIX)] if penultimate.endswith(INPUT_SUFFIX) else None
    excluded = {id(p) for p in student.get_submodule(classifier).parameters()} if classifier else set()
    return [p for p in student.parameters() if id(p) not in excluded]


def require_init_stage(name: str, init_epochs: int, what: str) -> None:
    if init_epochs < 1:
        raise ConfigError(
            f"{name} needs its initialisation stage ({what}), but init_epochs={init_epochs}. Set "
            f"distill.{name}.init_epochs to at least 1 (the published recipe, RepDistiller, uses 30)."
        )


def stage_pairs(name: str, student_taps: list[str], teacher_taps: list[str],
                context: BuildContext) -> list[tuple[str, str, torch.Size, torch.Size]]:
    """(student tap, teacher tap, shapes) per pair, refusing unequal counts and non-spatial taps."""
    if len(student_taps) != len(teacher_taps) or not student_taps:
        raise ConfigError(
            f"{name} pairs student taps {student_taps} with teacher taps {teacher_taps}, but the counts differ "
            f"or are zero (e.g. the two models have different numbers of stages). Set distill.{name}.student_taps and "
            f"distill.{name}.teacher_taps to lists of equal length, e.g. the last three stages of each."
        )
    pairs = []
    for s_tap, t_tap in zip(student_taps, teacher_taps):
        s_shape, t_shape = context.student_shapes[s_tap], context.teacher_shapes[t_tap]
        if len(s_shape) != 4 or len(t_shape) != 4:
            raise ConfigError(
                f"{name} needs spatial feature maps (N,C,H,W); student tap {s_tap!r} has shape {tuple(s_shape)} "
                f"and teacher tap {t_tap!r} has {tuple(t_shape)}. Use stage taps, not 'penultimate'."
            )
        pairs.append((s_tap, t_tap, s_shape, t_shape))
    return pairs
