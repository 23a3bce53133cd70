"""Small convnets for small grayscale images (sklearn digits at 8×8, MNIST / Fashion-MNIST at 28×28).

Not from a paper: a teacher/student pair sized so the default CPU job trains in seconds while the
teacher still clearly beats the student, which is what the quick demonstration of Hinton et al.,
"Distilling the Knowledge in a Neural Network", 2015, needs. Global average pooling makes both work at
any input size. Both declare the standard taps (two stages, pre-ReLU features included) so every
feature-based method runs on them too.
"""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.models import register_model
from kd_lightning.taps import Taps


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class SmallConvNet(nn.Module):
    """stem (3×3 conv) → stage1 (width, stride 1) → stage2 (2·width, stride 2) → global pool → linear."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 16, convs_per_stage: int = 1) -> None:
        super().__init__()
        if width < 1 or convs_per_stage < 1:
            raise ValueError(f"width and convs_per_stage must be >= 1, got {width} and {convs_per_stage}")
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, width))
        stage1: list[nn.Module] = []
        stage2 = _conv_bn_relu(width, 2 * width, stride=2)
        for _ in range(convs_per_stage):
            stage1 += _conv_bn_relu(width, width)
        for _ in range(convs_per_stage - 1):
            stage2 += _conv_bn_relu(2 * width, 2 * width)
        self.stage1 = nn.Sequential(*stage1)
        self.stage2 = nn.Sequential(*stage2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def declared_taps(self) -> Taps:
        # Each stage is a flat conv-bn-relu sequence, so its last module is the ReLU to read the input of.
        return Taps(
            points={
                "stem": "stem",
                "stage1": "stage1", "stage2": "stage2",
                "stage1_pre": f"stage1.{len(self.stage1) - 1}:input",
                "stage2_pre": f"stage2.{len(self.stage2) - 1}:input",
                "penultimate": "fc:input",
            },
            stages=("stage1", "stage2"),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1))


@register_model("convnet_small")
def convnet_small(num_classes: int, in_channels: int = 1, width: int = 16) -> SmallConvNet:
    """Student: one conv per stage, widths 16/32 (about 7k parameters at 10 classes)."""
    return SmallConvNet(num_classes, in_channels, width=width, convs_per_stage=1)


@register_model("convnet_tiny")
def convnet_tiny(num_classes: int, in_channels: int = 1, width: int = 4) -> SmallConvNet:
    """The default job's student: widths 4/8 (about 0.6k parameters at 10 classes), small enough that on
    digits it clearly trails the teacher, which leaves KD something to transfer (convnet_small at width 16
    reaches ~99% alone, within noise of the teacher)."""
    return SmallConvNet(num_classes, in_channels, width=width, convs_per_stage=1)


@register_model("convnet_large")
def convnet_large(num_classes: int, in_channels: int = 1, width: int = 32) -> SmallConvNet:
    """Teacher: two convs per stage at twice the student's width (about 10× its parameters).

    Width 32 rather than more: on sklearn digits width 48 reached the same test accuracy at twice the cost.
    """
    return SmallConvNet(num_classes, in_channels, width=width, convs_per_stage=2)
