from __future__ import annotations

from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import BuildContext, DistillInputs, DistillTerm
from kd_lightning.losses.terms.rkd import require_embeddings


class PKT(DistillTerm):
    """Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018.

    KL(P_t ‖ P_s) between the batch's conditional-probability matrices built from the cosine kernel
    (cos + 1)/2 of the embeddings (`functional.pkt`, RepDistiller's `PKT`, code from the paper's author).
    CIFAR-100 setting of RepDistiller (CRD benchmark): weight 30000 on the penultimate (pooled) embedding.
    """

    def __init__(self, weight: float = 30000.0, student_tap: str = "penultimate", teacher_tap: str = "penultimate",
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        self.student_taps = [student_tap]
        self.teacher_taps = [teacher_tap]

    def check(self, name: str, context: BuildContext) -> None:
        super().check(name, context)
        require_embeddings(self, name, context)

    def loss(self, inputs: DistillInputs) -> Tensor:
        return functional.pkt(inputs.student_features[self.student_taps[0]],
                              inputs.teacher_features[self.teacher_taps[0]])
