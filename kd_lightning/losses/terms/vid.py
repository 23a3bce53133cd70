from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import STAGES, BuildContext, DistillInputs, DistillTerm, as_tap_list
from kd_lightning.losses.terms.stage_taps import match_resolution, stage_pairs


class VID(DistillTerm):
    """Ahn et al. 2019, "Variational Information Distillation for Knowledge Transfer" (CVPR).

    Per stage pair, the teacher feature t is modelled as N(μ(s), σ²) with μ a 1×1-conv regressor of the
    student feature (conv–ReLU–conv–ReLU–conv, no bias, C_t hidden channels) and a learned per-channel
    σ² = softplus(α_c) + ε, initialised to 5 (ε = 1e-5); loss = Σ_pairs mean ½((μ − t)²/σ² + log σ²)
    (see `functional.variational_information`). Stages as RepDistiller's feat[1:-1]; weight 1 on CIFAR-100
    (CRD benchmark). Like RepDistiller's VIDLoss, the larger map of a pair is average-pooled to the smaller.
    """

    def __init__(self, weight: float = 1.0, init_pred_var: float = 5.0, eps: float = 1e-5,
                 student_taps: str | list[str] = STAGES, teacher_taps: str | list[str] = STAGES,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        if init_pred_var <= eps or eps <= 0:
            raise ConfigError(f"vid needs 0 < eps < init_pred_var; got eps={eps}, init_pred_var={init_pred_var}.")
        self.init_pred_var = init_pred_var
        self.eps = eps
        self.student_taps = as_tap_list(student_taps)
        self.teacher_taps = as_tap_list(teacher_taps)
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    def build(self, context: BuildContext) -> None:
        pairs = stage_pairs("vid", self.student_taps, self.teacher_taps, context)
        # softplus⁻¹(init_pred_var − eps), so that the initial variance is exactly init_pred_var.
        log_scale = math.log(math.expm1(self.init_pred_var - self.eps))
        self.regressors = nn.ModuleList(_regressor(s_shape[1], t_shape[1]) for _, _, s_shape, t_shape in pairs)
        self.log_scales = nn.ParameterList(nn.Parameter(torch.full((t_shape[1],), log_scale))
                                           for _, _, _, t_shape in pairs)

    def loss(self, inputs: DistillInputs) -> Tensor:
        total = inputs.student_logits.new_zeros((), dtype=torch.float32)
        for regressor, log_scale, s_tap, t_tap in zip(self.regressors, self.log_scales, self.student_taps,
                                                       self.teacher_taps):
            student, teacher = match_resolution(inputs.student_features[s_tap], inputs.teacher_features[t_tap])
            variance = F.softplus(log_scale) + self.eps
            total = total + functional.variational_information(regressor(student), teacher, variance)
        return total


def _regressor(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 1, bias=False), nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 1, bias=False),
    )
