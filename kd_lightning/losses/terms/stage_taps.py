"""What feature-map terms share: stage-pair checks, and the student parameters that initialisation stages
(AB, FSP) train."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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


def check_paired(name: str, student_taps: list[str], teacher_taps: list[str]) -> None:
    """Refuse tap lists that cannot be zipped into student/teacher pairs."""
    if len(student_taps) != len(teacher_taps) or not student_taps:
        raise ConfigError(
            f"{name} pairs student taps {student_taps} with teacher taps {teacher_taps}, but the counts differ "
            f"or are zero (e.g. the two models have different numbers of stages). Set distill.{name}.student_taps "
            f"and distill.{name}.teacher_taps to lists of equal length, e.g. the last three stages of each."
        )


def stage_pairs(name: str, student_taps: list[str], teacher_taps: list[str],
                context: BuildContext) -> list[tuple[str, str, torch.Size, torch.Size]]:
    """(student tap, teacher tap, shapes) per pair, refusing unequal counts and non-spatial taps."""
    check_paired(name, student_taps, teacher_taps)
    pairs = []
    for s_tap, t_tap in zip(student_taps, teacher_taps):
        s_shape, t_shape = context.student_shapes[s_tap], context.teacher_shapes[t_tap]
        if len(s_shape) != 4 or len(t_shape) != 4:
            if len(s_shape) == 4 or len(t_shape) == 4:  # a map on one side only: another architecture or modality
                raise ConfigError(
                    f"{name} needs spatial feature maps (N,C,H,W) on both networks, but student tap {s_tap!r} has "
                    f"shape {tuple(s_shape)} and teacher tap {t_tap!r} has {tuple(t_shape)}: a map and a vector (a "
                    f"network of another kind, e.g. an MLP on another input). Relate them with a term that reads one "
                    f"vector per sample from each: fitnet or supervision_transfer on `penultimate` (a learned linear "
                    f"map; the map side pooled), or a relational term (rkd, pkt, sp, crd), or distil the logits (kd).")
            raise ConfigError(
                f"{name} needs spatial feature maps (N,C,H,W); student tap {s_tap!r} has shape {tuple(s_shape)} "
                f"and teacher tap {t_tap!r} has {tuple(t_shape)}. Use stage taps (e.g. distill.{name}.student_taps="
                f"stages distill.{name}.teacher_taps=stages), not 'penultimate'."
            )
        pairs.append((s_tap, t_tap, s_shape, t_shape))
    return pairs


def match_resolution(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger of two feature maps to the other's resolution, as the reference codes do."""
    s_size, t_size = student.shape[-2:], teacher.shape[-2:]
    if s_size[0] > t_size[0]:
        student = F.adaptive_avg_pool2d(student, t_size)
    elif s_size[0] < t_size[0]:
        teacher = F.adaptive_avg_pool2d(teacher, s_size)
    return student, teacher
