"""Model registry and factory: `build_model(name, num_classes, in_channels)`.

Zoo modules register factory functions with `@register_model(name)`; each factory takes
`num_classes` and `in_channels` keyword arguments and returns a plain `nn.Module` returning logits.
`torchvision:<name>` builds any torchvision classification model, `timm:<name>` any timm model.
"""

from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry(
    "model", hint="Any torchvision classifier is also available as 'torchvision:<name>', e.g. 'torchvision:resnet18', "
                  "and any timm model as 'timm:<name>', e.g. 'timm:vit_tiny_patch16_224'."
)
TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"


def register_model(name: str, **meta: Any):
    return MODELS.register(name, **meta)


def build_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered, torchvision or timm model; the result carries `kd_spec`, the arguments that rebuild it."""
    # A list option from a config (e.g. an MLP's widths) arrives as a ListConfig, which a weights_only load
    # of the exported spec cannot read back.
    kwargs = {key: OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig))
              else value for key, value in kwargs.items()}
    # The named input the network reads (`inputs.<role>`; an exported spec keeps it): not an architecture option.
    reads = kwargs.pop("input", None)
    if name.startswith(TORCHVISION_PREFIX):
        from kd_lightning.models.torchvision_models import build_torchvision_model

        model = build_torchvision_model(name[len(TORCHVISION_PREFIX):], num_classes, in_channels, **kwargs)
    elif name.startswith(TIMM_PREFIX):
        from kd_lightning.models.timm_models import build_timm_model  # timm is imported only when used

        model = build_timm_model(name[len(TIMM_PREFIX):], num_classes, in_channels, **kwargs)
    else:
        factory = MODELS.get(name)
        try:
            model = factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
        except TypeError as error:
            raise ConfigError(f"Model {name!r} could not be built with arguments {kwargs}: {error}. Remove or "
                              f"rename the unexpected keyword in the model's config.") from error
    # Weights files are not part of the architecture: a rebuilt model gets its weights from a state_dict.
    spec_kwargs = {key: value for key, value in kwargs.items() if key != "weights"}
    model.kd_spec = {"name": name, "num_classes": num_classes, "in_channels": in_channels, **spec_kwargs}
    if kwargs.get("weights") is not None:
        model.kd_weights = str(kwargs["weights"])  # where an evaluated-only stage's weights came from, for results
    if reads is not None:
        from kd_lightning.data.inputs import attach_input

        attach_input(model, str(reads))
    return model


def check_input_size(model: nn.Module, image_size: tuple[int, int], role: str = "student") -> None:
    """Refuse a network built for images of another size (a ViT's img_size / patch grid) with the fix."""
    if hasattr(model, "kd_token_layout"):
        from kd_lightning.models.timm_models import check_input_size as check_vit

        check_vit(model, image_size, role)


def module_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def _load_zoo() -> None:
    # Import for the side effect of registration; kept in one place so the registry is always complete.
    from kd_lightning.models import (  # noqa: F401
        cifar_resnet, lenet, mlp, mobilenetv1, mobilenetv2, resnet_bottleneck, shufflenet, small, vgg, wrn,
    )


_load_zoo()
