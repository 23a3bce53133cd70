from __future__ import annotations

from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import DistillInputs, DistillTerm


class L1Logits(DistillTerm):
    """Logit matching by mean absolute error, mean over batch and classes (DFAD, Fang et al. 2019), whose
    unbounded, non-saturating gradient suits a student chasing an adversarial generator; its recipe trains
    without cross-entropy (data-free), so its config states CE weight 0."""

    recipe_ce_weight = 0.0

    def loss(self, inputs: DistillInputs) -> Tensor:
        return functional.l1_logits(inputs.student_logits, inputs.teacher_logits)

    def sample_losses(self, inputs: DistillInputs) -> Tensor:
        return (inputs.student_logits.float() - inputs.teacher_logits.float()).abs().mean(1)
