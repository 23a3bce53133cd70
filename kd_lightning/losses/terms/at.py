from __future__ import annotations

import torch
from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import STAGES, BuildContext, DistillInputs, DistillTerm, as_tap_list
from kd_lightning.losses.terms.stage_taps import match_resolution, stage_pairs


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
        stage_pairs("at", self.student_taps, self.teacher_taps, context)

    def loss(self, inputs: DistillInputs) -> Tensor:
        total = inputs.student_logits.new_zeros((), dtype=torch.float32)
        for s_tap, t_tap in zip(self.student_taps, self.teacher_taps):
            student, teacher = match_resolution(inputs.student_features[s_tap], inputs.teacher_features[t_tap])
            total = total + functional.attention_transfer(student, teacher, self.p)
        return total
