from __future__ import annotations

import torch
from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import LAST_STAGE, BuildContext, DistillInputs, DistillTerm, as_tap_list
from kd_lightning.losses.terms.stage_taps import check_paired


class SP(DistillTerm):
    """Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.

    Σ over tap pairs of ‖G_t − G_s‖_F²/b², G the row-normalised b×b Gram matrix of the flattened activations
    (`functional.similarity_preserving`). CIFAR-100 setting of RepDistiller (CRD benchmark): weight 3000 on
    the output of the last stage only (tap alias "last_stage", its feat[-2]); the paper's γ plays the
    weight's role. Student and teacher maps may differ in channels and resolution; the tap lists may also
    use the aliases "stages" and "stages_pre".
    """

    def __init__(self, weight: float = 3000.0, student_taps: str | list[str] = LAST_STAGE,
                 teacher_taps: str | list[str] = LAST_STAGE, warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        self.student_taps = as_tap_list(student_taps)
        self.teacher_taps = as_tap_list(teacher_taps)

    def check(self, name: str, context: BuildContext) -> None:
        super().check(name, context)
        check_paired(name, self.student_taps, self.teacher_taps)

    def loss(self, inputs: DistillInputs) -> Tensor:
        total = inputs.student_logits.new_zeros((), dtype=torch.float32)
        for s_tap, t_tap in zip(self.student_taps, self.teacher_taps):
            total = total + functional.similarity_preserving(inputs.student_features[s_tap],
                                                             inputs.teacher_features[t_tap])
        return total

