from __future__ import annotations

from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import DistillInputs, DistillTerm


class TfKD(DistillTerm):
    """Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization" (CVPR 2020), Tf-KD_self.

    multiplier · T² · KL(teacher ‖ student) averaged over batch and classes (`functional.tf_kd_self`, the
    reference `loss_kd_self`). Published ResNet-18/CIFAR-100 recipe (experiments/kd_experiments/
    resnet18_distill/resnet18_self_teacher/params.json): α = weight 0.95, T=6, multiplier 50, and CE 0.05
    (the reference's 1 − α at α 0.95). The CE weight is fixed, not derived from `weight`: set
    `distill.tf_kd.ce_weight` to 1 − α when changing the weight. `scheme=tf_kd_self` trains the teacher, a copy
    of the student's architecture, first.
    """

    recipe_ce_weight = 0.05  # the one source of the default (conf/distill/tf_kd.yaml leaves ce_weight null)

    def __init__(self, weight: float = 0.95, temperature: float = 6.0, multiplier: float = 50.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        self.temperature = float(temperature)
        self.multiplier = float(multiplier)

    def loss(self, inputs: DistillInputs) -> Tensor:
        return functional.tf_kd_self(inputs.student_logits, inputs.teacher_logits, self.temperature, self.multiplier)
