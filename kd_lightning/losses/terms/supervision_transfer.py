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
    the recipe trains with cross-entropy weight 0 (conf/distill/supervision_transfer.yaml). It is a pre-training
    of the layers up to the tap: at CE weight 0 nothing trains the layers after it (the classifier), so the
    student's accuracy means nothing until labels fine-tune it, as the paper fine-tunes on the new modality.

    Taps: the paper transfers at pool5 ↔ pool5, the last convolutional block of AlexNet/VGG; the counterpart
    here is each model's deepest declared stage (`last_stage`), the map before global pooling. φ: the
    identity when the two taps have one shape (the paper's same-architecture case); otherwise a learnable 1×1
    convolution (with bias) for maps, a linear layer for vectors, with a fixed average pooling or nearest
    upsampling where the two maps' resolutions differ by an integer factor, and a linear layer between a
    flattened map and a vector where one network reads an image and the other a feature vector (cross-modal:
    a CNN teacher on images, an MLP student on features) (`width_transform`). Unlike FitNet's
    regressor it has no BN/ReLU: φ is the paper's linear transform, and only the student's side is transformed. Loss: the element
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
    """φ, a linear map of the student's feature onto the teacher's shape: the identity for equal shapes, a linear
    layer for vectors or between a flattened map and a vector, a 1×1 convolution for maps, preceded by average pooling when the student's map is an integer
    multiple of the teacher's resolution and followed by nearest upsampling when it is an integer fraction of it
    (architectures whose pool5 sit at different strides). The teacher's feature, the target, is never resized."""
    if student_shape[1:] == teacher_shape[1:]:
        return nn.Identity()
    if len(student_shape) == len(teacher_shape) == 2:
        return nn.Linear(student_shape[1], teacher_shape[1])
    if len(student_shape) == len(teacher_shape) == 4:
        conv = nn.Conv2d(student_shape[1], teacher_shape[1], kernel_size=1)
        (s_height, s_width), (t_height, t_width) = student_shape[2:], teacher_shape[2:]
        if (s_height, s_width) == (t_height, t_width):
            return conv
        if s_height % t_height == 0 and s_width % t_width == 0 and s_height // t_height == s_width // t_width:
            factor = s_height // t_height
            return nn.Sequential(nn.AvgPool2d(factor), conv)
        if t_height % s_height == 0 and t_width % s_width == 0 and t_height // s_height == t_width // s_width:
            return nn.Sequential(conv, nn.Upsample(scale_factor=t_height // s_height, mode="nearest"))
    # A map and a vector (another kind of network on another modality: an MLP on features, a CNN on images): the
    # linear map between the flattened map and the vector, the general linear φ.
    if len(student_shape) == 4 and len(teacher_shape) == 2:
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.Size(student_shape[1:]).numel()), teacher_shape[1]))
    if len(student_shape) == 2 and len(teacher_shape) == 4:
        return nn.Sequential(nn.Linear(student_shape[1], int(torch.Size(teacher_shape[1:]).numel())),
                             nn.Unflatten(1, tuple(teacher_shape[1:])))
    raise ConfigError(
        f"supervision_transfer maps student tap {student_tap!r} of shape {tuple(student_shape[1:])} onto teacher tap "
        f"{teacher_tap!r} of shape {tuple(teacher_shape[1:])} with a linear map, which needs two vectors or two "
        f"feature maps whose resolutions differ by one integer factor in both directions. Pick other taps, e.g. "
        f"distill.supervision_transfer.student_tap=stage2 distill.supervision_transfer.teacher_tap=stage2."
    )
