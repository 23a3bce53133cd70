from __future__ import annotations

from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import BuildContext, DistillInputs, DistillTerm


class EmbeddingTerm(DistillTerm):
    """A term on one (batch, dim) embedding per network, by default the pooled `penultimate` tap."""

    def __init__(self, weight: float, warmup_epochs: int = 0, student_tap: str = "penultimate",
                 teacher_tap: str = "penultimate") -> None:
        super().__init__(weight, warmup_epochs)
        self.student_taps = [student_tap]
        self.teacher_taps = [teacher_tap]

    def check(self, name: str, context: BuildContext) -> None:
        super().check(name, context)
        require_embeddings(self, name, context)

    def embeddings(self, inputs: DistillInputs) -> tuple[Tensor, Tensor]:
        return inputs.student_features[self.student_taps[0]], inputs.teacher_features[self.teacher_taps[0]]


class RKD(EmbeddingTerm):
    """Park et al., "Relational Knowledge Distillation", CVPR 2019.

    25·distance + 50·angle: smooth-L1 between the student's and teacher's mean-normalised pairwise distances
    and triplet angle cosines of the batch's embeddings (`functional.rkd`, RepDistiller's `RKDLoss`).
    CIFAR-100 setting of RepDistiller (CRD benchmark): weight 1 on the penultimate (pooled) embedding.
    """

    def __init__(self, weight: float = 1.0, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 student_tap: str = "penultimate", teacher_tap: str = "penultimate", warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs, student_tap, teacher_tap)
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    def loss(self, inputs: DistillInputs) -> Tensor:
        return functional.rkd(*self.embeddings(inputs), self.distance_weight, self.angle_weight)


def require_embeddings(term: DistillTerm, name: str, context: BuildContext) -> None:
    """Refuse spatial maps for terms whose published weight was tuned on (batch, dim) embeddings."""
    for side, taps, shapes in (("student", term.student_taps, context.student_shapes),
                               ("teacher", term.teacher_taps, context.teacher_shapes)):
        for tap in taps:
            if len(shapes[tap]) != 2:
                raise ConfigError(
                    f"{type(term).__name__} relates per-sample embedding vectors, but {side} tap {tap!r} has shape "
                    f"{tuple(shapes[tap][1:])} per sample, a spatial map. Set distill.{name}.{side}_tap=penultimate "
                    f"(the pooled embedding its published weight was tuned on)."
                )
