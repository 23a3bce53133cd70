from __future__ import annotations

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import LAST_STAGE, BuildContext, DistillInputs, DistillTerm


class SupervisionTransfer(DistillTerm):
    """Gupta, Hoffman & Malik, CVPR 2016, "Cross Modal Distillation for Supervision Transfer".

    The student (on a new modality, e.g. depth) learns to reproduce the teacher's mid-level feature on the
    paired labelled-modality input (RGB): min_W Σ_i f(t(I_i), φ(g(J_i))), f the L2 loss, without labels, so
    the recipe trains with cross-entropy weight 0 (conf/distill/supervision_transfer.yaml).

    Taps: the paper transfers at pool5 ↔ pool5, the last convolutional block of AlexNet/VGG; the counterpart
    here is each model's deepest declared stage (`last_stage`), the map before global pooling. φ: the
    identity when the two taps have one shape (the paper's same-architecture case); a learnable 1×1
    convolution (with bias) for maps of equal resolution and different widths, a linear layer for vectors.
    Unlike FitNet's regressor it has no BN/ReLU: φ is the paper's linear transform. Loss: the element
    mean of the squared error (`functional.supervision_transfer` says why not the paper's sum).
    """

    recipe_ce_weight = 0.0

    def __init__(self, weight: float = 1.0, student_tap: str = LAST_STAGE, teacher_tap: str = LAST_STAGE,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        self.student_taps = [student_tap]
        self.teacher_taps = [teacher_tap]
        self.transform: nn.Module = nn.Identity()

    def build(self, context: BuildContext) -> None:
        self.transform = width_transform(context.student_shapes[self.student_taps[0]],
                                         context.teacher_shapes[self.teacher_taps[0]],
                                         self.student_taps[0], self.teacher_taps[0])

    def pair(self, inputs: DistillInputs) -> tuple[Tensor, Tensor]:
        return (self.transform(inputs.student_features[self.student_taps[0]]),
                inputs.teacher_features[self.teacher_taps[0]])

    def loss(self, inputs: DistillInputs) -> Tensor:
        return functional.supervision_transfer(*self.pair(inputs))

    def sample_losses(self, inputs: DistillInputs) -> Tensor:
        student, teacher = self.pair(inputs)
        return (student.float() - teacher.float()).pow(2).flatten(1).mean(dim=1)


def width_transform(student_shape: torch.Size, teacher_shape: torch.Size, student_tap: str,
                    teacher_tap: str) -> nn.Module:
    """φ: identity for equal shapes, else a learnable linear map across channels (1×1 conv or linear)."""
    if student_shape[1:] == teacher_shape[1:]:
        return nn.Identity()
    if len(student_shape) == len(teacher_shape) == 2:
        return nn.Linear(student_shape[1], teacher_shape[1])
    if len(student_shape) == len(teacher_shape) == 4 and student_shape[2:] == teacher_shape[2:]:
        return nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1)
    raise ConfigError(
        f"supervision_transfer maps student tap {student_tap!r} of shape {tuple(student_shape[1:])} onto teacher tap "
        f"{teacher_tap!r} of shape {tuple(teacher_shape[1:])} with a per-position linear map, which needs two "
        f"feature maps of one resolution (C,H,W with equal H,W) or two vectors. Pick taps at the same resolution, "
        f"e.g. distill.supervision_transfer.student_tap=stage2 distill.supervision_transfer.teacher_tap=stage2, or "
        f"use distill=fitnet, whose regressor spans a factor-2 resolution gap."
    )
