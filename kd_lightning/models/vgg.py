"""CIFAR VGGs with batch norm, as in the CRD / RepDistiller benchmark.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015,
in the CIFAR form of Tian et al., "Contrastive Representation Distillation", ICLR 2020 (RepDistiller
models/vgg.py, whose `vgg8`..`vgg19` are its `*_bn` builders): five conv blocks, no FC layers, global
average pool and one linear classifier; vgg8 is its extra configuration 'S' (one conv per block).

Module names follow RepDistiller so its checkpoints load. Each block ends in a BN whose ReLU is a
separate module (`relu1`..`relu4`), so a stage's pre-ReLU feature is simply the block's output.
"""

from __future__ import annotations

from torch import Tensor, nn

from kd_lightning.models import register_model
from kd_lightning.models.init import init_weights
from kd_lightning.taps import Taps

_CFGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        in_channels = width
    # The block ends at the BN: its ReLU lives outside (reluK) so the pre-activation can be tapped.
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3) -> None:
        super().__init__()
        widths_in = [in_channels] + [block[-1] for block in cfg[:-1]]
        for k, (widths, c_in) in enumerate(zip(cfg, widths_in)):
            setattr(self, f"block{k}", _make_block(widths, c_in))
            setattr(self, f"relu{k}", nn.ReLU())
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cfg[-1][-1], num_classes)

        init_weights(self, linear_std=0.01)

    def declared_taps(self) -> Taps:
        points = {"stem": "relu0", "penultimate": "classifier:input"}
        for k in range(1, 5):
            points[f"stage{k}"] = f"relu{k}"
            points[f"stage{k}_pre"] = f"block{k}"
        return Taps(points=points, stages=("stage1", "stage2", "stage3", "stage4"))

    def forward(self, x: Tensor) -> Tensor:
        h = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        # As in the reference: a 4th pooling only for 64×64 input (Tiny-ImageNet); at 32×32 block4 runs at 4×4.
        if h == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.pool4(x).flatten(1))


def _register(name: str) -> None:
    @register_model(name)
    def build(num_classes: int, in_channels: int = 3) -> VGG:
        return VGG(_CFGS[name], num_classes=num_classes, in_channels=in_channels)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"CIFAR {name} with batch norm, as RepDistiller's {name}_bn."


for _name in _CFGS:
    _register(_name)
