from __future__ import annotations

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import STAGES, BuildContext, DistillInputs, DistillTerm, as_tap_list
from kd_lightning.losses.terms.stage_taps import feature_parameters, require_init_stage, stage_pairs


class FSP(DistillTerm):
    """Yim et al. 2017, "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and
    Transfer Learning" (CVPR).

    FSP matrices G = mean over positions of top_i·bottom_j (see `functional.fsp_matrix`) between
    consecutive taps (stem, stage1, …, stageN: RepDistiller's feat[:-1]); an initialisation stage
    (`init_epochs`, 30 in RepDistiller) trains the student's feature layers (not its classifier) on
    Σ_pairs mean((G_s − G_t)²), unweighted. As in the paper and RepDistiller (`loss_kd = 0`), the main
    training then uses the task loss only, so `loss` is 0 and `weight` (50, the CRD benchmark's β) has
    nothing to scale. Student and teacher taps must have equal channel counts (no adapters), as there. The
    initialisation stage runs at the main learning rate as in RepDistiller (`init_lr=None`).
    """

    main_stage_loss = False

    def __init__(self, weight: float = 50.0, init_epochs: int = 30,
                 student_taps: str | list[str] = ("stem", STAGES), teacher_taps: str | list[str] = ("stem", STAGES),
                 warmup_epochs: int = 0, init_lr: float | None = None) -> None:
        super().__init__(weight, warmup_epochs, init_epochs, init_lr)
        require_init_stage("fsp", self.init_epochs, "it matches the FSP matrices only there")
        self.student_taps = as_tap_list(student_taps)
        self.teacher_taps = as_tap_list(teacher_taps)

    def build(self, context: BuildContext) -> None:
        pairs = stage_pairs("fsp", self.student_taps, self.teacher_taps, context)
        mismatched = [(s, t, s_shape[1], t_shape[1]) for s, t, s_shape, t_shape in pairs if s_shape[1] != t_shape[1]]
        if len(pairs) < 2 or mismatched:
            raise ConfigError(
                f"fsp compares C×C' matrices between consecutive taps, so it needs at least two taps and equal "
                f"channel counts in each student/teacher pair; got {len(pairs)} pair(s), mismatched (tap, tap, "
                f"C_s, C_t): {mismatched}. Pick taps of equal widths (e.g. resnet56→resnet20, wrn40_2→wrn16_2) or "
                f"use a term with adapters such as ab or ofd."
            )

    def init_loss(self, inputs: DistillInputs) -> Tensor:
        student = [inputs.student_features[tap] for tap in self.student_taps]
        teacher = [inputs.teacher_features[tap] for tap in self.teacher_taps]
        total = inputs.student_logits.new_zeros((), dtype=torch.float32)
        for i in range(len(student) - 1):
            g_s = functional.fsp_matrix(student[i], student[i + 1])
            g_t = functional.fsp_matrix(teacher[i], teacher[i + 1])
            total = total + (g_s - g_t).pow(2).mean()
        return total

    def loss(self, inputs: DistillInputs) -> Tensor:
        return inputs.student_logits.new_zeros((), dtype=torch.float32)

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return feature_parameters(student)
