from __future__ import annotations

from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import DistillInputs, DistillTerm


class DIST(DistillTerm):
    """Huang et al., "Knowledge Distillation from A Stronger Teacher" (DIST), NeurIPS 2022.

    T²·(β·inter + γ·intra) with inter/intra = 1 − mean Pearson correlation of softmax(z/T) over the rows
    (samples) / columns (classes) of the batch (`functional.dist`), returned as the parts `inter` = T²·β·inter
    and `intra` = T²·γ·intra. CIFAR-100 recipe of the authors' code (`dist_cifar.yaml` of their classification
    code: `kd: dist_t4`, `kd_loss_weight: 2`, `ori_loss_weight: 1`): β=γ=1, T=4, weight 2 with CE 1; the
    paper's ImageNet recipe is β=γ=2 at T=1.
    """

    def __init__(self, weight: float = 2.0, beta: float = 1.0, gamma: float = 1.0, temperature: float = 4.0,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        self.beta = beta
        self.gamma = gamma
        self.temperature = temperature

    def loss(self, inputs: DistillInputs) -> dict[str, Tensor]:
        inter, intra = functional.dist_parts(inputs.student_logits, inputs.teacher_logits, self.temperature)
        scale = self.temperature**2
        return {"inter": scale * self.beta * inter, "intra": scale * self.gamma * intra}
