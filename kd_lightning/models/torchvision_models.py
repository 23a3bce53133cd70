"""Any torchvision classifier as `torchvision:<name>`, with offline-only pretrained weights.

Weights are never downloaded: training machines are often offline, and a silent multi-hundred-MB
download in the middle of a sweep is worse than a clear error naming the file to copy in.
"""

from __future__ import annotations

import difflib
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.taps import Taps

# Shown when a name is unknown, so the message stays one readable paragraph (there are ~80 models).
_EXAMPLES = ("resnet18", "resnet50", "wide_resnet50_2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny",
             "vit_b_16", "swin_t")

# torchvision ResNet / ResNeXt / Wide ResNet module names; `stem` is after the max-pool so that all four
# stages and the stem are at the resolutions the ImageNet KD recipes (e.g. CRD, OFD, ReviewKD) use.
_RESNET_TAPS = {"stem": "maxpool", "stage1": "layer1", "stage2": "layer2", "stage3": "layer3", "stage4": "layer4",
                "penultimate": "fc:input"}


def available_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def weights_path(weights: torchvision.models.WeightsEnum) -> Path:
    """Where `torch.hub` looks for these weights before it would download them."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def build_torchvision_model(name: str, num_classes: int, in_channels: int = 3, weights: str | None = None,
                            **kwargs: Any) -> nn.Module:
    """Build torchvision classifier `name`; `weights` is an enum member name such as "IMAGENET1K_V1".

    With `in_channels != 3` the first convolution is replaced (initialised from the pretrained RGB
    filters when weights are given). ResNet-family models declare the standard stage taps.
    """
    valid = available_models()
    if name not in valid:
        raise ConfigError(_unknown_message(name, valid))
    weights_member = _resolve_weights(name, weights, num_classes) if weights is not None else None
    try:
        model = torchvision.models.get_model(name, weights=weights_member, num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise ConfigError(f"torchvision model {name!r} could not be built with arguments {kwargs}: {error}. Remove "
                          f"or rename the unexpected keyword in the model's config.") from error
    except (RuntimeError, OSError, EOFError) as error:
        if weights_member is None:
            raise
        raise ConfigError(f"The weights file {weights_path(weights_member)} for torchvision model {name!r} could not "
                          f"be loaded ({error}). It is probably truncated or corrupt: copy it again from "
                          f"{weights_member.url}.") from error
    if in_channels != 3:
        _replace_first_conv(model, name, in_channels, pretrained=weights_member is not None)
    if isinstance(model, torchvision.models.ResNet):
        _declare_resnet_taps(model)
    return model


def _declare_resnet_taps(model: torchvision.models.ResNet) -> None:
    """Stage taps, plus pre-ReLU ones for OFD/AB/ReviewKD.

    A torchvision block calls its one `relu` module several times, the last time on the residual sum, so
    a `relu:input` hook keeps exactly the block's pre-activation output, provided the ReLU does not
    overwrite its input: every ReLU is made non-inplace (a little more memory, same results).
    """
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    points = dict(_RESNET_TAPS)
    for k in range(1, 5):
        points[f"stage{k}_pre"] = f"layer{k}.{len(getattr(model, f'layer{k}')) - 1}.relu:input"
    # An instance attribute that taps.declared_taps calls; a partial (unlike a lambda) keeps the model
    # picklable for spawn-based multi-process training and torch.save.
    model.declared_taps = partial(Taps, points=points, stages=("stage1", "stage2", "stage3", "stage4"))


def _unknown_message(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3)
    suggestion = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    from kd_lightning.models import MODELS

    zoo = f" {name!r} is a kd_lightning zoo model: use it without the 'torchvision:' prefix." if name in MODELS else ""
    examples = ", ".join(e for e in _EXAMPLES if e in valid)
    return (f"Unknown torchvision model {name!r}.{suggestion}{zoo} Valid names include {examples} ({len(valid)} in "
            f"all; `torchvision.models.list_models(module=torchvision.models)` lists them).")


def _resolve_weights(name: str, weights: str, num_classes: int) -> torchvision.models.WeightsEnum:
    enum = torchvision.models.get_model_weights(name)
    member_name = str(weights).split(".")[-1]  # accept "IMAGENET1K_V1" and "ResNet18_Weights.IMAGENET1K_V1"
    if member_name not in enum.__members__:
        raise ConfigError(f"torchvision model {name!r} has no weights {weights!r}. Available: "
                          f"{', '.join(enum.__members__)} (members of {enum.__name__}), or null for random init.")
    member = enum[member_name]
    weight_classes = len(member.meta["categories"])
    if num_classes != weight_classes:
        raise ConfigError(f"{enum.__name__}.{member.name} has a {weight_classes}-class head but num_classes="
                          f"{num_classes}. Set num_classes={weight_classes} to use these weights (e.g. an ImageNet "
                          f"teacher), or set weights to null to train {name!r} from scratch with {num_classes} "
                          f"classes.")
    path = weights_path(member)
    if not path.is_file():
        raise ConfigError(f"Pretrained weights {enum.__name__}.{member.name} for {name!r} are not on this machine and "
                          f"kd_lightning never downloads. Fetch {member.url} on a machine with internet and copy it "
                          f"to {path} (that is torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it), or set "
                          f"weights to null.")
    return member


def _replace_first_conv(model: nn.Module, name: str, in_channels: int, pretrained: bool) -> None:
    found = next(((path, m) for path, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None or found[1].groups != 1:
        raise ConfigError(f"torchvision model {name!r} does not start with an ordinary Conv2d, so in_channels="
                          f"{in_channels} cannot be set. Use in_channels=3 (e.g. repeat a grayscale channel).")
    path, old = found
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, old.dilation,
                    bias=old.bias is not None, padding_mode=old.padding_mode)
    if pretrained:
        # Spread the RGB filters' sum over the new channels: an image whose channels are all equal then
        # gives exactly the activation the pretrained net gave for its gray RGB version.
        with torch.no_grad():
            new.weight.copy_(old.weight.sum(1, keepdim=True).expand_as(new.weight) / in_channels)
            if old.bias is not None:
                new.bias.copy_(old.bias)
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
