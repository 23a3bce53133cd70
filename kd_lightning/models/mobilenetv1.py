"""MobileNet (V1) for ImageNet, the ResNet50 → MobileNet student of the ImageNet distillation tables.

Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications",
arXiv 2017, at width 1.0 and 224×224 input (4.23M parameters at 1000 classes). This is the network of
Heo et al., "A Comprehensive Overhaul of Feature Distillation", ICCV 2019, reused by Chen et al.,
"Distilling Knowledge via Knowledge Review", CVPR 2021 (ReviewKD ImageNet/models/mobilenet.py) and Zhao
et al., "Decoupled Knowledge Distillation", CVPR 2022 (mdistiller models/imagenet/mobilenetv1.py).

Module names follow those references (`model.<i>`, `fc`) so their checkpoints load; the ReLUs are not
in place so the pre-ReLU stage outputs can be tapped. Weights keep PyTorch's default initialisation, as
in the references. The references' `AvgPool2d(7)` is an adaptive pool here, so other input sizes work.
"""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.models import register_model
from kd_lightning.taps import Taps

# (output channels, stride) of the 13 depthwise-separable blocks after the stride-2 stem.
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
           (512, 1), (1024, 2), (1024, 1)]
# Indices in `model` of the last block at each resolution (56, 28, 14, 7 at 224 input): the references' f1..f4.
_STAGE_BLOCKS = (3, 5, 11, 13)
# Index of the final ReLU inside a depthwise-separable block, whose input is the stage's pre-activation.
_BLOCK_RELU = 5


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU())


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(),
    )


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        layers = [_conv_bn(in_channels, 32, 2)]
        channels = 32
        for out_channels, stride in _BLOCKS:
            layers.append(_conv_dw(channels, out_channels, stride))
            channels = out_channels
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)

    def declared_taps(self) -> Taps:
        points = {"stem": "model.0", "penultimate": "fc:input"}
        for k, block in enumerate(_STAGE_BLOCKS, start=1):
            points[f"stage{k}"] = f"model.{block}"
            points[f"stage{k}_pre"] = f"model.{block}.{_BLOCK_RELU}:input"
        return Taps(points=points, stages=("stage1", "stage2", "stage3", "stage4"))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.model(x).flatten(1))


@register_model("MobileNetV1")
def mobilenetv1(num_classes: int, in_channels: int = 3) -> MobileNetV1:
    """ImageNet MobileNet (V1), width 1.0: the student of the ResNet50 → MobileNet ImageNet benchmark."""
    return MobileNetV1(num_classes=num_classes, in_channels=in_channels)
