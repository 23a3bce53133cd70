"""LeNet-5 and LeNet-5-half: the data-free distillation references' MNIST sanity pair.

Layer sizes as in DAFL's lenet.py (huawei-noah/Efficient-Computing, also DFAD's network/lenet.py): three
5×5 convolutions (6, 16, 120 channels; the half model 3, 8, 60), two 2×2 max-pools, then 84 (42) hidden
units and the classifier. The references feed 32×32 images (MNIST resized); here a smaller or larger
input is resized to 32×32 bilinearly first, as their `transforms.Resize((32, 32))` does, so 28×28
Fashion-MNIST and 8×8 digits reach the same network and a 32×32 input passes untouched.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.models import register_model
from kd_lightning.taps import Taps

INPUT_SIZE = 32


class LeNet5(nn.Module):
    # The feature DAFL's activation loss reads (`forward(out_feature=True)` returns relu3's 120-d output,
    # `output.view(-1, 120)`), not the 84-d `penultimate` input of the classifier.
    out_feature_tap = "stage3"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3, hidden = (int(round(n * width)) for n in (6, 16, 120, 84))
        self.conv1, self.relu1, self.pool1 = nn.Conv2d(in_channels, c1, 5), nn.ReLU(), nn.MaxPool2d(2, 2)
        self.conv2, self.relu2, self.pool2 = nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2, 2)
        self.conv3, self.relu3 = nn.Conv2d(c2, c3, 5), nn.ReLU()
        self.fc1, self.relu4 = nn.Linear(c3, hidden), nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def declared_taps(self) -> Taps:
        # The three conv blocks are the stages; `stage3` (120×1×1, the half model's 60) is the feature the
        # references return (`out_feature`) and DAFL's activation loss reads (`out_feature_tap`).
        return Taps(points={"stem": "conv1", "stage1": "relu1", "stage2": "relu2", "stage3": "relu3",
                            "stage1_pre": "relu1:input", "stage2_pre": "relu2:input", "stage3_pre": "relu3:input",
                            "penultimate": "fc2:input"},
                    stages=("stage1", "stage2", "stage3"))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.conv3(x)).flatten(1)
        return self.fc2(self.relu4(self.fc1(x)))


@register_model("lenet5")
def lenet5(num_classes: int, in_channels: int = 1) -> LeNet5:
    """LeNet-5 (about 62k parameters at 10 classes): the references' MNIST teacher."""
    return LeNet5(num_classes, in_channels)


@register_model("lenet5_half")
def lenet5_half(num_classes: int, in_channels: int = 1) -> LeNet5:
    """LeNet-5-half, every layer at half width (about 16k parameters): the references' MNIST student."""
    return LeNet5(num_classes, in_channels, width=0.5)
