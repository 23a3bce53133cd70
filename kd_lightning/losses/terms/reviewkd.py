from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import STAGES, STAGES_PRE, BuildContext, DistillInputs, DistillTerm, as_tap_list


class ReviewKD(DistillTerm):
    """Chen et al. 2021, "Distilling Knowledge via Knowledge Review" (CVPR).

    The student's stages and pooled embedding (`penultimate`, as a 1×1 map) are fused from the deepest to
    the shallowest by attention-based fusion (ABF) modules (residual learning: each level's 1×1-conv+BN
    feature is blended with the upsampled fused feature of the level below by two sigmoid attention maps,
    then a 3×3 conv+BN maps it to the teacher's width and size); the outputs are compared with the
    teacher's pre-ReLU stages and pooled embedding by the hierarchical context loss (HCL, pyramid levels
    4, 2, 1; `functional.hierarchical_context`), summed over levels. Follows the authors' CIFAR code
    (dvlab-research/ReviewKD, same in mdistiller): mid channels min(512, width of the deepest student
    feature), nearest upsampling, kaiming_uniform(a=1) convs, post-ReLU student and pre-ReLU teacher
    features. Weight 5 with a 20-epoch linear warm-up (their CIFAR-100 script for most pairs and
    mdistiller's resnet32x4→resnet8x4 config; their script uses 8 for ShuffleNetV2, 0.6 for
    resnet56→resnet20, 1 for resnet110→resnet32).
    """

    def __init__(self, weight: float = 5.0, warmup_epochs: int = 20,
                 student_taps: str | list[str] = (STAGES, "penultimate"),
                 teacher_taps: str | list[str] = (STAGES_PRE, "penultimate"), max_mid_channels: int = 512) -> None:
        super().__init__(weight, warmup_epochs)
        self.student_taps = as_tap_list(student_taps)
        self.teacher_taps = as_tap_list(teacher_taps)
        self.max_mid_channels = max_mid_channels
        self.fusions = nn.ModuleList()

    def build(self, context: BuildContext) -> None:
        if len(self.student_taps) != len(self.teacher_taps) or not self.student_taps:
            raise ConfigError(
                f"reviewkd pairs student taps {self.student_taps} with teacher taps {self.teacher_taps}, but the "
                f"counts differ (the models have different numbers of stages). Set distill.reviewkd.student_taps "
                f"and distill.reviewkd.teacher_taps to lists of equal length, shallow to deep."
            )
        shapes = [(context.student_shapes[s], context.teacher_shapes[t])
                  for s, t in zip(self.student_taps, self.teacher_taps)]
        bad = [(s, t) for (s, t), (s_shape, t_shape) in zip(zip(self.student_taps, self.teacher_taps), shapes)
               if len(s_shape) not in (2, 4) or len(t_shape) not in (2, 4)]
        if bad:
            raise ConfigError(f"reviewkd needs feature maps (N,C,H,W) or embeddings (N,D); the pairs {bad} are "
                              f"neither. Use stage taps and 'penultimate'.")
        mid_channels = min(self.max_mid_channels, shapes[-1][0][1])
        last = len(shapes) - 1
        self.fusions = nn.ModuleList(AttentionFusion(s_shape[1], mid_channels, t_shape[1], fuse=i < last)
                                     for i, (s_shape, t_shape) in enumerate(shapes))

    def loss(self, inputs: DistillInputs) -> Tensor:
        student = [_as_map(inputs.student_features[tap]) for tap in self.student_taps]
        teacher = [_as_map(inputs.teacher_features[tap]) for tap in self.teacher_taps]
        total = inputs.student_logits.new_zeros((), dtype=torch.float32)
        residual = None
        for i in reversed(range(len(student))):
            output, residual = self.fusions[i](student[i], residual, teacher[i].shape[-2:])
            total = total + functional.hierarchical_context(output, teacher[i])
        return total


class AttentionFusion(nn.Module):
    """ABF: 1×1 conv+BN to `mid` channels, attention blend with the deeper level's residual, 3×3 conv+BN."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.project = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)
        nn.init.kaiming_uniform_(self.project[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: torch.Size) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            weights = self.attention(torch.cat([x, residual], dim=1))
            x = x * weights[:, :1] + residual * weights[:, 1:]
        if x.shape[-2:] != out_size:
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.project(x), x


def _as_map(feature: Tensor) -> Tensor:
    return feature[:, :, None, None] if feature.ndim == 2 else feature
