from __future__ import annotations

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import STAGES_PRE, BuildContext, DistillInputs, DistillTerm, as_tap_list
from kd_lightning.losses.terms.stage_taps import feature_parameters, require_init_stage, stage_pairs


class AB(DistillTerm):
    """Heo et al. 2019, "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden
    Neurons" (AAAI).

    An initialisation stage (`init_epochs`, 30 in RepDistiller) trains the student's feature layers and a
    connector per stage pair on Σ_i w_i·AB_i / b · 3/1000, AB_i the margin (μ=1) hinge loss between the
    connected student and the teacher pre-ReLU features of stage i (see `functional.activation_boundary`),
    w_i = 2^(i−n+1) from the shallowest (¼, ½, 1 for three stages). All of that, the per-stage weights and
    the 3/1000 included, is RepDistiller's ABLoss and init stage (the classifier stays untouched there).
    The main training then uses no AB loss, as RepDistiller (`loss_kd = 0`; the paper, too, trains the
    initialised student on the task loss), so `loss` is 0 and `weight` (1, the CRD benchmark's β) has
    nothing to scale. Connectors follow RepDistiller: none where the shapes already agree, otherwise the
    paper's 1×1 conv + BN (a stride-2 3×3 conv or a 4×4 transposed conv + BN where the resolution differs
    by a factor of 2, as RepDistiller's ConvReg); they only train in the initialisation stage, which runs at
    the main learning rate as in RepDistiller (`init_lr=None`).
    """

    main_stage_loss = False

    def __init__(self, weight: float = 1.0, init_epochs: int = 30, margin: float = 1.0,
                 student_taps: str | list[str] = STAGES_PRE, teacher_taps: str | list[str] = STAGES_PRE,
                 warmup_epochs: int = 0, init_lr: float | None = None) -> None:
        super().__init__(weight, warmup_epochs, init_epochs, init_lr)
        require_init_stage("ab", self.init_epochs, "it transfers activation boundaries only there")
        self.margin = margin
        self.student_taps = as_tap_list(student_taps)
        self.teacher_taps = as_tap_list(teacher_taps)
        self.connectors = nn.ModuleList()

    def build(self, context: BuildContext) -> None:
        pairs = stage_pairs("ab", self.student_taps, self.teacher_taps, context)
        self.connectors = nn.ModuleList(connector(s_shape, t_shape, s_tap, t_tap, identity_if_equal=True)
                                        for s_tap, t_tap, s_shape, t_shape in pairs)

    def init_loss(self, inputs: DistillInputs) -> Tensor:
        count = len(self.connectors)
        total = inputs.student_logits.new_zeros((), dtype=torch.float32)
        for i, (connect, s_tap, t_tap) in enumerate(zip(self.connectors, self.student_taps, self.teacher_taps)):
            student = connect(inputs.student_features[s_tap])
            stage = functional.activation_boundary(student, inputs.teacher_features[t_tap], self.margin)
            total = total + 2.0 ** (i - count + 1) * stage
        return total / inputs.student_logits.shape[0] * 3 / 1000

    def loss(self, inputs: DistillInputs) -> Tensor:
        return inputs.student_logits.new_zeros((), dtype=torch.float32)

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return feature_parameters(student) + self.init_only_parameters()

    def init_only_parameters(self) -> list[nn.Parameter]:
        return list(self.connectors.parameters())


def bn_connector(s_channels: int, t_channels: int) -> nn.Sequential:
    """1×1 conv + BN without a ReLU, initialised N(0, 2/(k²·C_out)) as the AB and OFD authors' connectors."""
    conv = nn.Conv2d(s_channels, t_channels, kernel_size=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels))


def connector(s_shape: torch.Size, t_shape: torch.Size, s_tap: str, t_tap: str,
              identity_if_equal: bool = False) -> nn.Module:
    """Maps a student pre-activation map onto the teacher's shape (a conv + BN, no ReLU)."""
    (_, s_channels, s_height, s_width), (_, t_channels, t_height, t_width) = s_shape, t_shape
    if (s_height, s_width) == (t_height, t_width):
        if identity_if_equal and s_channels == t_channels:
            return nn.Identity()
        return bn_connector(s_channels, t_channels)
    if (s_height, s_width) == (2 * t_height, 2 * t_width):
        return nn.Sequential(nn.Conv2d(s_channels, t_channels, 3, stride=2, padding=1), nn.BatchNorm2d(t_channels))
    if (2 * s_height, 2 * s_width) == (t_height, t_width):
        return nn.Sequential(nn.ConvTranspose2d(s_channels, t_channels, 4, stride=2, padding=1),
                             nn.BatchNorm2d(t_channels))
    raise ConfigError(
        f"Student tap {s_tap!r} is {s_height}×{s_width} and teacher tap {t_tap!r} is {t_height}×{t_width}; the "
        f"connector handles equal sizes or a factor of 2. Pair taps at the same or adjacent resolution."
    )
