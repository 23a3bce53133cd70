"""The CIFAR ResNet50 teacher of the CRD / RepDistiller benchmark.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (bottleneck blocks, [3, 4, 6, 3]),
with the 3×3 stride-1 stem and no max-pool of the CIFAR variant that Tian et al., "Contrastive
Representation Distillation", ICLR 2020 use as a teacher (RepDistiller models/resnetv2.py, `ResNet50`).

Parameter names follow RepDistiller (`shortcut`, `linear`) so its checkpoints load directly.
"""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.models import register_model
from kd_lightning.models.init import init_weights
from kd_lightning.taps import Taps


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
        # Separate module so `relu_out:input` is the pre-activation sum (RepDistiller's `preact`).
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(out + self.shortcut(x))


class BottleneckResNet(nn.Module):
    def __init__(self, num_blocks: list[int], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)

        init_weights(self)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def declared_taps(self) -> Taps:
        points = {"stem": "relu", "penultimate": "linear:input"}
        for k in range(1, 5):
            layer = getattr(self, f"layer{k}")
            points[f"stage{k}"] = f"layer{k}"
            points[f"stage{k}_pre"] = f"layer{k}.{len(layer) - 1}.relu_out:input"
        return Taps(points=points, stages=("stage1", "stage2", "stage3", "stage4"))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.avgpool(out).flatten(1))


@register_model("ResNet50")
def resnet50(num_classes: int, in_channels: int = 3) -> BottleneckResNet:
    """CIFAR ResNet50 (bottleneck, [3, 4, 6, 3], 3×3 stem), RepDistiller's `ResNet50`."""
    return BottleneckResNet([3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels)
