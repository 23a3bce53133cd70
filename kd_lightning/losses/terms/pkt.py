from __future__ import annotations

from torch import Tensor

from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import DistillInputs
from kd_lightning.losses.terms.rkd import EmbeddingTerm


class PKT(EmbeddingTerm):
    """Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018.

    KL(P_t ‖ P_s) between the batch's conditional-probability matrices built from the cosine kernel
    (cos + 1)/2 of the embeddings (`functional.pkt`, RepDistiller's `PKT`, code from the paper's author).
    CIFAR-100 setting of RepDistiller (CRD benchmark): weight 30000 on the penultimate (pooled) embedding.
    """

    def __init__(self, weight: float = 30000.0, student_tap: str = "penultimate", teacher_tap: str = "penultimate",
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs, student_tap, teacher_tap)

    def loss(self, inputs: DistillInputs) -> Tensor:
        return functional.pkt(*self.embeddings(inputs))
