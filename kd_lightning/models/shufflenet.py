"""ShuffleNetV1 and ShuffleNetV2 for CIFAR as used in the CRD / RepDistiller benchmark.

Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices",
CVPR 2018 (groups 3, widths 240/480/960), and Ma et al., "ShuffleNet V2: Practical Guidelines for
Efficient CNN Architecture Design", ECCV 2018 (net size 1×), in the CIFAR form (1×1 stem, no max-pool)
of Tian et al., "Contrastive Representation Distillation", ICLR 2020 (RepDistiller ShuffleNetv1.py,
ShuffleNetv2.py). Parameter names follow RepDistiller so its checkpoints load.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kd_lightning.models import register_model
from kd_lightning.taps import Taps


class ShuffleBlock(nn.Module):
    """Channel shuffle: (N, g·c, H, W) → (N, c·g, H, W), interleaving the groups."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _stage_taps(model: nn.Module, num_layers: int, pre_relu: str) -> Taps:
    points = {"stem": "relu", "penultimate": "linear:input"}
    for k in range(1, num_layers + 1):
        last = len(getattr(model, f"layer{k}")) - 1
        points[f"stage{k}"] = f"layer{k}"
        points[f"stage{k}_pre"] = f"layer{k}.{last}.{pre_relu}:input"
    return Taps(points=points, stages=tuple(f"stage{k}" for k in range(1, num_layers + 1)))


# ShuffleNet V1 ---------------------------------------------------------------------------------------


class ShuffleV1Unit(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        # The first unit sees the 24-channel stem, too narrow to group (paper §3.3).
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.relu1 = nn.ReLU()
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.relu_out = nn.ReLU()  # its input is RepDistiller's `preact`

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        # Downsampling units concatenate the pooled input instead of adding it (paper Fig. 2c).
        return self.relu_out(torch.cat([out, res], 1) if self.stride == 2 else out + res)


class ShuffleNetV1(nn.Module):
    def __init__(self, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups: int = 3, num_classes: int = 100,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's avg_pool2d(4) at 32×32
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # The first unit's branch only makes the channels the concatenated shortcut does not bring.
            cat_planes = self.in_planes if i == 0 else 0
            layers.append(ShuffleV1Unit(self.in_planes, out_planes - cat_planes, 2 if i == 0 else 1, groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def declared_taps(self) -> Taps:
        return _stage_taps(self, 3, "relu_out")

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.avgpool(out).flatten(1))


# ShuffleNet V2 ---------------------------------------------------------------------------------------


class SplitBlock(nn.Module):
    def __init__(self, ratio: float) -> None:
        super().__init__()
        self.ratio = ratio

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = int(x.size(1) * self.ratio)
        return x[:, :c], x[:, c:]


class ShuffleV2Unit(nn.Module):
    """Stride-1 unit: half the channels pass through, the other half go through 1×1 → dw3×3 → 1×1."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = SplitBlock(split_ratio)
        c = int(in_channels * split_ratio)
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.shuffle = ShuffleBlock(groups=2)

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = self.split(x)
        out = self.relu1(self.bn1(self.conv1(x2)))
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        # The reference applies the ReLU to the branch only; x1 is a previous unit's ReLU output (>= 0), so
        # ReLU over the concatenation is identical and makes this ReLU's input exactly the reference's
        # `preact` (cat([x1, pre-ReLU branch]), before the shuffle).
        return self.shuffle(self.relu(torch.cat([x1, out], 1)))


class ShuffleV2DownUnit(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        # left branch: dw3×3/2 → 1×1
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU()
        # right branch: 1×1 → dw3×3/2 → 1×1
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.relu3 = nn.ReLU()
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu5 = nn.ReLU()
        self.shuffle = ShuffleBlock(groups=2)

    def forward(self, x: Tensor) -> Tensor:
        left = self.relu2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu3(self.bn3(self.conv3(x)))
        right = self.relu5(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


_V2_CONFIGS = {
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2: ((224, 488, 976, 2048), (3, 7, 3)),
}


class ShuffleNetV2(nn.Module):
    def __init__(self, net_size: float = 1, num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        if net_size not in _V2_CONFIGS:
            raise ValueError(f"ShuffleNetV2 net_size must be one of {sorted(_V2_CONFIGS)}, got {net_size}")
        out_channels, num_blocks = _V2_CONFIGS[net_size]
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # the reference's avg_pool2d(4) at 32×32
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [ShuffleV2DownUnit(self.in_channels, out_channels)]
        layers += [ShuffleV2Unit(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def declared_taps(self) -> Taps:
        return _stage_taps(self, 3, "relu")

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.relu2(self.bn2(self.conv2(out)))
        return self.linear(self.avgpool(out).flatten(1))


@register_model("ShuffleNetV1")
def shufflenet_v1(num_classes: int, in_channels: int = 3) -> ShuffleNetV1:
    """ShuffleNetV1 (g=3; 240/480/960; 4/8/4 units) for CIFAR, RepDistiller's `ShuffleV1`."""
    return ShuffleNetV1(num_classes=num_classes, in_channels=in_channels)


@register_model("ShuffleNetV2")
def shufflenet_v2(num_classes: int, in_channels: int = 3, net_size: float = 1) -> ShuffleNetV2:
    """ShuffleNetV2 1× (116/232/464/1024) for CIFAR, RepDistiller's `ShuffleV2`."""
    return ShuffleNetV2(net_size=net_size, num_classes=num_classes, in_channels=in_channels)
