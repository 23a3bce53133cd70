from __future__ import annotations

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import BuildContext, DistillInputs, DistillTerm


class FitNet(DistillTerm):
    """Romero et al. 2015, "FitNets: Hints for Thin Deep Nets".

    MSE(W_r(F_s), F_t) between one student stage (the guided layer) and one teacher stage (the hint),
    with a learnable regressor W_r: for 4-D features RepDistiller's ConvReg (conv + BN + ReLU; the conv is
    (1+s_H−t_H)×(1+s_W−t_W), so 1×1 for equal resolutions, a stride-2 3×3 for twice the teacher's, a 4×4
    transposed conv for half of it), linear for embeddings. Trained jointly with the task loss, as in the
    CRD benchmark (weight 100, hint stage 2), rather than the paper's separate hint pre-training stage.
    """

    def __init__(self, weight: float = 100.0, student_tap: str = "stage2", teacher_tap: str = "stage2",
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        self.student_taps = [student_tap]
        self.teacher_taps = [teacher_tap]
        self.regressor: nn.Module = nn.Identity()

    def build(self, context: BuildContext) -> None:
        student_shape = context.student_shapes[self.student_taps[0]]
        teacher_shape = context.teacher_shapes[self.teacher_taps[0]]
        self.regressor = regressor(student_shape, teacher_shape, self.student_taps[0], self.teacher_taps[0])

    def loss(self, inputs: DistillInputs) -> Tensor:
        student = self.regressor(inputs.student_features[self.student_taps[0]])
        return functional.fitnet_hint(student, inputs.teacher_features[self.teacher_taps[0]])

    def sample_losses(self, inputs: DistillInputs) -> Tensor:
        # Per-sample element mean of the squared error, as CA-MKD weights its feature loss (CAMKD.py).
        student = self.regressor(inputs.student_features[self.student_taps[0]])
        teacher = inputs.teacher_features[self.teacher_taps[0]]
        return (student.float() - teacher.float()).pow(2).flatten(1).mean(dim=1)


def regressor(student_shape: torch.Size, teacher_shape: torch.Size, student_tap: str, teacher_tap: str) -> nn.Module:
    """A learnable map from a student feature shape to a teacher feature shape (ConvReg or linear)."""
    if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 4):
        raise ConfigError(
            f"Cannot regress student tap {student_tap!r} of shape {tuple(student_shape[1:])} onto teacher tap "
            f"{teacher_tap!r} of shape {tuple(teacher_shape[1:])}: both must be spatial maps (C,H,W) or both "
            f"embeddings (D). Pick taps of the same kind, e.g. student_tap=stage2 teacher_tap=stage2, or, between "
            f"a map and a vector (another kind of network or input), student_tap=penultimate "
            f"teacher_tap=penultimate (pooled embeddings, a linear regressor), or distill=[supervision_transfer]."
        )
    if len(student_shape) == 2:
        return nn.Linear(student_shape[1], teacher_shape[1])
    (_, s_channels, s_height, s_width), (_, t_channels, t_height, t_width) = student_shape, teacher_shape
    # RepDistiller's ConvReg, in its order: the factor-2 cases first, then a valid conv spanning the gap.
    if s_height == 2 * t_height and s_width == 2 * t_width:
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=3, stride=2, padding=1)
    elif t_height == 2 * s_height and t_width == 2 * s_width:
        conv = nn.ConvTranspose2d(s_channels, t_channels, kernel_size=4, stride=2, padding=1)
    elif s_height >= t_height and s_width >= t_width:
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=(1 + s_height - t_height, 1 + s_width - t_width))
    else:
        raise ConfigError(
            f"Student tap {student_tap!r} is {s_height}×{s_width} and teacher tap {teacher_tap!r} is "
            f"{t_height}×{t_width}; the regressor maps a student map at least as large as the teacher's, or half "
            f"its size. Choose taps at the same or adjacent resolution (e.g. the same stage number for two CIFAR "
            f"ResNets)."
        )
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels), nn.ReLU())
