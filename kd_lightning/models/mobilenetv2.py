"""MobileNetV2 for CIFAR as used in the CRD / RepDistiller benchmark (`mobile_half`).

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, in the CIFAR form of
Jin et al., "Knowledge Distillation via Route Constrained Optimization", ICCV 2019, used at width 0.5 by
Tian et al., "Contrastive Representation Distillation", ICLR 2020 (RepDistiller models/mobilenetv2.py).

Module names follow RepDistiller so its checkpoints load. Stage outputs are linear bottlenecks (they end
in a BN with no ReLU), so they already are the pre-activation features RepDistiller returns for OFD:
`stageK_pre` names the same tensor as `stageK`.
"""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.models import register_model
from kd_lightning.models.init import init_weights
from kd_lightning.taps import Taps

# (expansion t, output channels c, repeats n, first stride s); t=None means the model's expand_ratio.
_SETTING = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
            (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]
# Blocks whose outputs are RepDistiller's f1..f4 (the last block of each resolution).
_STAGE_BLOCKS = (1, 2, 4, 6)


def _conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False), nn.BatchNorm2d(oup), nn.ReLU()
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        # Unlike torchvision, the 1×1 expansion is kept even at expand_ratio 1, as in the reference
        # (it is part of the published parameter count).
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, in_channels: int = 3, width_mult: float = 0.5,
                 expand_ratio: int = 6) -> None:
        super().__init__()
        input_channel = int(32 * width_mult)
        # Stride-2 stem even at 32×32, as in the reference; the net then ends at 2×2.
        self.conv1 = _conv_bn_relu(in_channels, input_channel, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in _SETTING:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, expand_ratio if t is None else t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's AvgPool2d(2, ceil_mode=True) at 32×32
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))

        init_weights(self, linear_std=0.01)

    def declared_taps(self) -> Taps:
        points = {"stem": "conv1", "penultimate": "classifier:input"}
        for k, block in enumerate(_STAGE_BLOCKS, start=1):
            points[f"stage{k}"] = points[f"stage{k}_pre"] = f"blocks.{block}"
        return Taps(points=points, stages=("stage1", "stage2", "stage3", "stage4"))

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        out = self.conv2(out)
        return self.classifier(self.avgpool(out).flatten(1))


@register_model("MobileNetV2")
def mobilenetv2(num_classes: int, in_channels: int = 3, width_mult: float = 0.5, expand_ratio: int = 6) -> MobileNetV2:
    """MobileNetV2 for CIFAR at width 0.5 by default: RepDistiller's `mobile_half`."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult,
                       expand_ratio=expand_ratio)
