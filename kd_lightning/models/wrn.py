"""Wide ResNets (pre-activation) of the CRD / RepDistiller benchmark.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016; the WRN-d-k variants used as teachers and
students by Tian et al., "Contrastive Representation Distillation", ICLR 2020 (RepDistiller models/wrn.py).

Parameter names follow RepDistiller (hence `convShortcut`) so its teacher checkpoints load directly.
Being pre-activation, a stage's output is the raw residual sum (RepDistiller's f1..f3); its pre-ReLU
feature for OFD is that sum after the *next* BN (`block2.layer.0.bn1`, `block3.layer.0.bn1`, final `bn1`),
i.e. the input of the ReLU that follows it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.models import register_model
from kd_lightning.models.init import init_weights
from kd_lightning.taps import Taps


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(activated)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        # Where the width changes, the shortcut projects the *activated* input (as in the reference).
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(nb_layers)
        ])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32×32 input: three groups of (depth-4)/6 pre-activation blocks."""

    def __init__(self, depth: int, widen_factor: int = 1, num_classes: int = 100, in_channels: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # RepDistiller's avg_pool2d(8), size-agnostic
        self.fc = nn.Linear(channels[3], num_classes)

        init_weights(self, zero_linear_bias=True)

    def declared_taps(self) -> Taps:
        return Taps(
            points={
                "stem": "conv1",
                "stage1": "block1", "stage2": "block2", "stage3": "block3",
                "stage1_pre": "block2.layer.0.relu1:input",
                "stage2_pre": "block3.layer.0.relu1:input",
                "stage3_pre": "relu:input",
                "penultimate": "fc:input",
            },
            stages=("stage1", "stage2", "stage3"),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return self.fc(self.avgpool(out).flatten(1))


def _register(name: str, depth: int, widen_factor: int) -> None:
    @register_model(name)
    def build(num_classes: int, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes=num_classes, in_channels=in_channels, drop_rate=drop_rate)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"WRN-{depth}-{widen_factor} (Zagoruyko & Komodakis 2016) as in CRD / RepDistiller."


for _name, _depth, _k in (("wrn_16_1", 16, 1), ("wrn_16_2", 16, 2), ("wrn_40_1", 40, 1), ("wrn_40_2", 40, 2)):
    _register(_name, _depth, _k)
