from __future__ import annotations

from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import DistillInputs, DistillTerm


class KD(DistillTerm):
    """Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

    T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)). CIFAR-100 recipe (CRD benchmark): T=4, weight 0.9 with CE 0.1.

    `logit_standardization=True` z-scores both logit vectors per sample first (Sun et al., "Logit
    Standardization in Knowledge Distillation", CVPR 2024; `functional.kd_standardized`, the authors' code);
    their CIFAR-100 recipe, base T=2 and weight 9 with CE 0.1, is conf/distill/kd_ls.yaml.
    """

    recipe_ce_weight = 0.1

    def __init__(self, weight: float = 0.9, temperature: float = 4.0, warmup_epochs: int = 0,
                 logit_standardization: bool = False) -> None:
        super().__init__(weight, warmup_epochs)
        self.temperature = temperature
        self.logit_standardization = bool(logit_standardization)

    def loss(self, inputs: DistillInputs) -> Tensor:
        if self.logit_standardization:
            return functional.kd_standardized(inputs.student_logits, inputs.teacher_logits, self.temperature)
        return functional.kd(inputs.student_logits, inputs.teacher_logits, self.temperature)

    def sample_losses(self, inputs: DistillInputs) -> Tensor:
        student, teacher = inputs.student_logits, inputs.teacher_logits
        if self.logit_standardization:
            student = functional._standardize_logits(student.float())
            teacher = functional._standardize_logits(teacher.float())
        return functional.kd_per_sample(student, teacher, self.temperature)
