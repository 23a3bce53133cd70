from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import STAGES, BuildContext, DistillInputs, DistillTerm, as_tap_list


class AT(DistillTerm):
    """Zagoruyko & Komodakis 2017, "Paying More Attention to Attention".

    Σ over stage pairs of mean((Q_s − Q_t)²), Q = normalize(mean_c A^p), p=2. CIFAR-100 weight 1000 on
    every stage (RepDistiller). When a pair differs in resolution, the larger map is average-pooled to the
    smaller one, as in the reference code.
    """

    def __init__(self, weight: float = 1000.0, p: float = 2.0, student_taps: str | list[str] = STAGES,
                 teacher_taps: str | list[str] = STAGES, warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        self.p = p
        self.student_taps = as_tap_list(student_taps)
        self.teacher_taps = as_tap_list(teacher_taps)

    def build(self, context: BuildContext) -> None:
        student_shapes, teacher_shapes = context.student_shapes, context.teacher_shapes
        if len(self.student_taps) != len(self.teacher_taps):
            raise ConfigError(
                f"AT pairs student taps {self.student_taps} with teacher taps {self.teacher_taps}, but the counts "
                f"differ. Set distill.at.student_taps and distill.at.teacher_taps to lists of equal length."
            )
        for s_tap, t_tap in zip(self.student_taps, self.teacher_taps):
            if len(student_shapes[s_tap]) != 4 or len(teacher_shapes[t_tap]) != 4:
                raise ConfigError(
                    f"AT needs spatial feature maps (N,C,H,W); student tap {s_tap!r} has shape "
                    f"{tuple(student_shapes[s_tap])} and teacher tap {t_tap!r} has {tuple(teacher_shapes[t_tap])}. "
                    f"Use stage taps, not 'penultimate'."
                )

    def loss(self, inputs: DistillInputs) -> Tensor:
        total = inputs.student_logits.new_zeros((), dtype=torch.float32)
        for s_tap, t_tap in zip(self.student_taps, self.teacher_taps):
            student, teacher = match_resolution(inputs.student_features[s_tap], inputs.teacher_features[t_tap])
            total = total + functional.attention_transfer(student, teacher, self.p)
        return total


def match_resolution(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    s_size, t_size = student.shape[-2:], teacher.shape[-2:]
    if s_size[0] > t_size[0]:
        student = F.adaptive_avg_pool2d(student, t_size)
    elif s_size[0] < t_size[0]:
        teacher = F.adaptive_avg_pool2d(teacher, s_size)
    return student, teacher
