"""Named intermediate outputs of any model, captured by forward hooks so no `forward` is edited.

A tap is written `module.path` (the module's output) or `module.path:input` (its first input, which is
how pre-activation features are read: the input of a block's final ReLU). Model families declare their
standard taps (`stem`, `stage1..N`, `stageK_pre`, `penultimate`) so configs can name stages instead of
paths; any module path works as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.tokens import LAYOUT_ATTRIBUTE, as_feature_map

INPUT_SUFFIX = ":input"


@dataclass(frozen=True)
class Taps:
    """A model family's standard tap points: name → module path (optionally with `:input`)."""

    points: Mapping[str, str]
    stages: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        missing = [s for s in self.stages if s not in self.points]
        if missing:
            raise ValueError(f"stages {missing} are not among the declared tap points {list(self.points)}")


def declared_taps(model: nn.Module) -> Taps:
    """The model's standard taps: its own `declared_taps()` if it has one, else a generic `penultimate`.

    The generic `penultimate` is the input of the last `nn.Linear`, which is the pooled embedding in
    nearly every classifier (torchvision ones included).
    """
    own = getattr(model, "declared_taps", None)
    if callable(own):
        return own()
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return Taps(points={"penultimate": linears[-1] + INPUT_SUFFIX} if linears else {})


def resolve_tap(model: nn.Module, tap: str, model_name: str = "model") -> tuple[str, bool]:
    """Map a tap name or module path to (module path, capture_input), with an error that lists taps."""
    spec = declared_taps(model).points.get(tap, tap)
    path, capture_input = (spec[: -len(INPUT_SUFFIX)], True) if spec.endswith(INPUT_SUFFIX) else (spec, False)
    modules = dict(model.named_modules())
    if path not in modules or path == "":
        declared = ", ".join(declared_taps(model).points) or "none"
        raise ConfigError(
            f"Model {model_name!r} has no tap {tap!r}. Its declared taps are: {declared}. "
            f"You can also name any module path (optionally with ':input'), e.g. "
            f"{next((n for n in modules if n), 'layer1')!r}; `kd_lightning.models.module_paths(model)` lists them all."
        )
    return path, capture_input


class FeatureTaps:
    """Registers forward hooks on a model and collects the named tensors of the latest forward pass.

    Use as a context manager or call `remove()`; `features` maps each requested tap name to the tensor
    captured in the most recent forward. A tensor that a later in-place op (e.g. `ReLU(inplace=True)`)
    modified is refused when read, because the feature would silently be the post-op value.

    A model that declares a token layout (`kd_lightning.tokens`, e.g. a timm ViT) has its declared B×N×C token
    taps (`stage1..N`, ...) read as B×C×h×w maps of the patch tokens, here and nowhere else, so every term that
    names stages sees maps from any model. A tap named by module path (`blocks.3`, `blocks.3.attn.qkv`) is what
    the module returns: tokens with their class/distillation tokens, for the terms that read tokens.
    """

    def __init__(self, model: nn.Module, taps: list[str] | tuple[str, ...], model_name: str = "model") -> None:
        self.model_name = model_name
        self.token_layout = getattr(model, LAYOUT_ATTRIBUTE, None)
        declared = declared_taps(model).points
        self._as_maps = {tap for tap in taps if tap in declared}
        self._captured: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for tap in dict.fromkeys(taps):
            path, capture_input = resolve_tap(model, tap, model_name)
            self._handles.append(modules[path].register_forward_hook(self._hook(tap, capture_input)))

    def _hook(self, tap: str, capture_input: bool):
        def store(module: nn.Module, inputs: tuple, output) -> None:
            tensor = inputs[0] if capture_input else output
            if isinstance(tensor, (tuple, list)):
                tensor = tensor[0]
            self._captured[tap] = tensor
            self._versions[tap] = -1 if torch.is_inference(tensor) else tensor._version

        return store

    @property
    def features(self) -> dict[str, torch.Tensor]:
        for tap, tensor in self._captured.items():
            if not torch.is_inference(tensor) and tensor._version != self._versions[tap]:
                raise ConfigError(
                    f"Tap {tap!r} of {self.model_name!r} was overwritten by an in-place operation after it was "
                    f"captured, so its value would be wrong. Tap a module whose output is not modified in place "
                    f"(e.g. the block output instead of a ':input' before an inplace ReLU), or construct the "
                    f"model with inplace=False."
                )
        return {tap: as_feature_map(tensor, self.token_layout) if tap in self._as_maps else tensor
                for tap, tensor in self._captured.items()}

    def clear(self) -> None:
        self._captured.clear()
        self._versions.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
