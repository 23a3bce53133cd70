from __future__ import annotations

from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import DistillInputs, DistillTerm


class DKD(DistillTerm):
    """Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.

    α·TCKD + β·NCKD on the logits (`functional.dkd_parts`, the authors' mdistiller `dkd_loss`), returned as
    the parts `tckd` = α·TCKD and `nckd` = β·NCKD so each is logged. CIFAR-100 defaults of mdistiller: α=1,
    β=8 (its per-pair configs use β=2 for resnet56→resnet20, β=6 for vgg13→vgg8), T=4, CE weight 1, weight 1.
    mdistiller also multiplies the loss by min(epoch/20, 1) over 1-based epochs, which the paper does not
    write; here that is `warmup_epochs=20` (the scheme's min(1, (epoch+1)/20) over 0-based epochs is the same).

    `logit_standardization=True` z-scores both logit vectors per sample before the DKD formula, as the DKD
    code of Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024) does; their CIFAR-100
    recipe is conf/distill/dkd_ls.yaml.
    """

    reads_targets = True  # the target-class mask

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, warmup_epochs: int = 20,
                 weight: float = 1.0, logit_standardization: bool = False) -> None:
        super().__init__(weight, warmup_epochs)
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.logit_standardization = bool(logit_standardization)

    def loss(self, inputs: DistillInputs) -> dict[str, Tensor]:
        parts = functional.dkd_standardized_parts if self.logit_standardization else functional.dkd_parts
        tckd, nckd = parts(inputs.student_logits, inputs.teacher_logits, inputs.targets, self.temperature)
        return {"tckd": self.alpha * tckd, "nckd": self.beta * nckd}
