from __future__ import annotations

import torch
from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import STAGES, BuildContext, DistillInputs, DistillTerm, as_tap_list
from kd_lightning.losses.terms.stage_taps import match_resolution, stage_pairs


class NST(DistillTerm):
    """Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", 2017.

    Σ over stage pairs of the squared MMD between the sets of L2-normalised channel maps under the
    polynomial kernel (xᵀy)² (`functional.nst`, RepDistiller's `NSTLoss`). CIFAR-100 setting of RepDistiller
    (CRD benchmark): weight 50 on every stage (its feat[1:-1]); when a pair differs in resolution the larger
    map is average-pooled to the smaller one, as in that code. Where RepDistiller zips stage lists of unequal
    length (silently dropping the deepest stages of the longer one), this term refuses them.
    """

    def __init__(self, weight: float = 50.0, student_taps: str | list[str] = STAGES,
                 teacher_taps: str | list[str] = STAGES, warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        self.student_taps = as_tap_list(student_taps)
        self.teacher_taps = as_tap_list(teacher_taps)

    def check(self, name: str, context: BuildContext) -> None:
        super().check(name, context)
        stage_pairs(name, self.student_taps, self.teacher_taps, context)

    def loss(self, inputs: DistillInputs) -> Tensor:
        total = inputs.student_logits.new_zeros((), dtype=torch.float32)
        for s_tap, t_tap in zip(self.student_taps, self.teacher_taps):
            student, teacher = match_resolution(inputs.student_features[s_tap], inputs.teacher_features[t_tap])
            total = total + functional.nst(student, teacher)
        return total
