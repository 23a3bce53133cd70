from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import BuildContext, DistillInputs
from kd_lightning.losses.terms.rkd import EmbeddingTerm


class CC(EmbeddingTerm):
    """Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019, as benchmarked.

    Both penultimate embeddings go through their own learnable linear map to `feat_dim`=128 (RepDistiller's
    `LinearEmbed`, trained with the student; the teacher's map too), then `functional.correlation_congruence`:
    mean over neighbouring samples of Σ_d |e_s − e_t|_i·|e_s − e_t|_{i+1}. This follows RepDistiller's
    `Correlation` and its CIFAR-100 weight 0.02, not the paper's text, which matches b×b instance-correlation
    matrices under a Taylor-expanded Gaussian RBF kernel (P=2, γ=0.4) on class-balanced batches.
    """

    def __init__(self, weight: float = 0.02, feat_dim: int = 128, student_tap: str = "penultimate",
                 teacher_tap: str = "penultimate", warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs, student_tap, teacher_tap)
        self.feat_dim = int(feat_dim)
        self.embed_student: nn.Module = nn.Identity()
        self.embed_teacher: nn.Module = nn.Identity()

    def build(self, context: BuildContext) -> None:
        student_shape = context.student_shapes[self.student_taps[0]]
        teacher_shape = context.teacher_shapes[self.teacher_taps[0]]
        if len(student_shape) == 2 and len(teacher_shape) == 2:  # anything else is refused by check()
            self.embed_student = nn.Linear(student_shape[1], self.feat_dim)
            self.embed_teacher = nn.Linear(teacher_shape[1], self.feat_dim)

    def loss(self, inputs: DistillInputs) -> Tensor:
        student = self.embed_student(inputs.student_features[self.student_taps[0]])
        teacher = self.embed_teacher(inputs.teacher_features[self.teacher_taps[0]])
        return functional.correlation_congruence(student, teacher)
