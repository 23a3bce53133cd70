"""CIFAR ResNets of the CRD / RepDistiller benchmark.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (§4.2, the 6n+2 CIFAR networks),
with the depths and the ×4-wide variants (resnet8x4, resnet32x4) used by Tian et al., "Contrastive
Representation Distillation", ICLR 2020 (github.com/HobbitLong/RepDistiller, models/resnet.py).

Module and parameter names follow RepDistiller so its published teacher checkpoints load with
`load_state_dict`. Taps follow its `forward(is_feat=True, preact=...)` feature list: stem = f0,
stage1..3 = f1..f3 (f1_pre..f3_pre before the last block's final ReLU), penultimate = f4.
"""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.models import register_model
from kd_lightning.models.init import init_weights
from kd_lightning.taps import Taps


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        # A module of its own (not F.relu) so `relu_out:input` is the pre-activation sum OFD distils.
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu_out(out + shortcut)


class CifarResNet(nn.Module):
    """6n+2-layer ResNet for 32×32 input: a 3×3 stem and three stages at strides 1, 2, 2."""

    def __init__(self, depth: int, num_filters: list[int], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(num_filters[1], n)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        # Adaptive rather than RepDistiller's AvgPool2d(8): identical at 32×32, and other sizes still work.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(num_filters[3] * BasicBlock.expansion, num_classes)

        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def declared_taps(self) -> Taps:
        points = {"stem": "relu", "penultimate": "fc:input"}
        for k, layer in enumerate((self.layer1, self.layer2, self.layer3), start=1):
            points[f"stage{k}"] = f"layer{k}"
            points[f"stage{k}_pre"] = f"layer{k}.{len(layer) - 1}.relu_out:input"
        return Taps(points=points, stages=("stage1", "stage2", "stage3"))

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


_SPECS = {
    "resnet8": (8, [16, 16, 32, 64]),
    "resnet14": (14, [16, 16, 32, 64]),
    "resnet20": (20, [16, 16, 32, 64]),
    "resnet32": (32, [16, 16, 32, 64]),
    "resnet44": (44, [16, 16, 32, 64]),
    "resnet56": (56, [16, 16, 32, 64]),
    "resnet110": (110, [16, 16, 32, 64]),
    "resnet8x4": (8, [32, 64, 128, 256]),
    "resnet32x4": (32, [32, 64, 128, 256]),
}


def _register(name: str, depth: int, num_filters: list[int]) -> None:
    @register_model(name)
    def build(num_classes: int, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, num_filters, num_classes=num_classes, in_channels=in_channels)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"CIFAR {name} (depth {depth}, widths {num_filters}), as in CRD / RepDistiller."


for _name, (_depth, _filters) in _SPECS.items():
    _register(_name, _depth, _filters)
