from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import LAST_STAGE, BuildContext, DistillInputs, DistillTerm
from kd_lightning.losses.terms.stage_taps import match_resolution, require_init_stage, stage_pairs


class FT(DistillTerm):
    """Kim et al. 2018, "Paraphrasing Complex Network: Network Compression via Factor Transfer" (NeurIPS).

    A paraphraser (3 conv + LeakyReLU(0.1) encoder, 3 transposed-conv decoder; factor channels
    ⌊k·C_t⌋, k=0.5) is first trained alone on the teacher's last stage with the reconstruction MSE
    (`init_epochs`, 30 in RepDistiller). Then a translator (3 conv + BN + LeakyReLU) maps the student's
    last stage to a factor, the larger factor map is average-pooled to the smaller one, and the loss is the
    mean absolute difference of L2-normalised factor vectors (p=1; `functional.factor_transfer`). The
    paraphraser is frozen in the main training: teacher factors are computed without gradient. Modules
    (no BN in the paraphraser, BN in the translator) follow RepDistiller, and so does `init_lr=0.01`, the
    paraphraser's constant learning rate there for ResNet/WRN students (other students: the main rate).

    factor="repdistiller" (default): RepDistiller's `FactorTransfer` (p1=2, p2=1), vector
    normalize(mean_c F²) of h·w entries, so the CRD benchmark's CIFAR-100 weight 200 (with CE 1) applies.
    factor="paper": the paper's and its authors' code's factor, the whole map flattened to c·h·w entries
    and L2-normalised; its entries are about √c times smaller (c factor channels), and the authors' code
    (CIFAR-10, ResNet56→ResNet20) weighs it with β=500.
    """

    def __init__(self, weight: float = 200.0, init_epochs: int = 30, rate: float = 0.5, factor: str = "repdistiller",
                 student_tap: str = LAST_STAGE, teacher_tap: str = LAST_STAGE, warmup_epochs: int = 0,
                 init_lr: float | None = 0.01) -> None:
        super().__init__(weight, warmup_epochs, init_epochs, init_lr)
        require_init_stage("ft", self.init_epochs, "the paraphraser would otherwise stay random")
        if not 0 < rate <= 1:
            raise ConfigError(f"ft.rate is the paraphraser's channel ratio k and must lie in (0, 1]; got {rate}.")
        if factor not in functional.FT_FACTORS:
            raise ConfigError(f"ft.factor must be one of {list(functional.FT_FACTORS)}, got {factor!r}: "
                              f"'repdistiller' (normalised mean_c F², weight 200) or 'paper' (normalised whole "
                              f"factor, the authors' weight 500).")
        self.rate = rate
        self.factor = factor
        self.student_taps = [student_tap]
        self.teacher_taps = [teacher_tap]
        self.paraphraser_encoder = nn.Sequential()
        self.paraphraser_decoder = nn.Sequential()
        self.translator = nn.Sequential()

    def build(self, context: BuildContext) -> None:
        [(_, _, s_shape, t_shape)] = stage_pairs("ft", self.student_taps, self.teacher_taps, context)
        s_channels, t_channels = s_shape[1], t_shape[1]
        factor_channels = max(1, int(t_channels * self.rate))
        widths = [t_channels, t_channels, factor_channels, factor_channels]
        self.paraphraser_encoder = _stack(nn.Conv2d, widths)
        self.paraphraser_decoder = _stack(nn.ConvTranspose2d, widths[::-1])
        self.translator = _stack(nn.Conv2d, [s_channels, s_channels, factor_channels, factor_channels], batch_norm=True)

    def init_loss(self, inputs: DistillInputs) -> Tensor:
        teacher = inputs.teacher_features[self.teacher_taps[0]]
        reconstruction = self.paraphraser_decoder(self.paraphraser_encoder(teacher))
        return F.mse_loss(reconstruction.float(), teacher.float())

    def loss(self, inputs: DistillInputs) -> Tensor:
        with torch.no_grad():
            teacher_factor = self.paraphraser_encoder(inputs.teacher_features[self.teacher_taps[0]])
        student_factor = self.translator(inputs.student_features[self.student_taps[0]])
        return functional.factor_transfer(*match_resolution(student_factor, teacher_factor), factor=self.factor)

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        return self.init_only_parameters()

    def init_only_parameters(self) -> list[nn.Parameter]:
        return [*self.paraphraser_encoder.parameters(), *self.paraphraser_decoder.parameters()]


def _stack(conv: type[nn.Module], channels: list[int], batch_norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1), *([nn.BatchNorm2d(c_out)] if batch_norm else []), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)
