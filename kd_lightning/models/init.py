"""The initialisation RepDistiller's CIFAR models use, shared so every family starts the same way."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """Kaiming-normal (fan_out) convolutions with zero bias, BN at identity; the classifier is drawn
    from N(0, linear_std) when given (VGG, MobileNetV2) and otherwise keeps PyTorch's default, with a
    zero bias where the reference sets one (WRN)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(module.bias)
