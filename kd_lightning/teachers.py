"""Teachers: safe loading, freezing, and the files that hold trained networks (exports, the stage cache)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError

EXPORT_FORMAT = "kd_lightning.student/1"
# A stage's trained networks by role (the stage cache); one with a single network is also a teacher file.
STAGE_FORMAT = "kd_lightning.stage/1"
# Where scheme checkpoints record the student's build spec (read back here when a checkpoint is a teacher).
CHECKPOINT_KEY = "kd_lightning"


class FrozenTeacher(nn.Module):
    """A teacher that cannot train: no gradients, always in eval mode, forward without autograd.

    Schemes keep it outside their module tree, so it is absent from optimizers, from checkpoints and
    from DDP's gradient and buffer synchronisation; `train()` on any parent cannot reach or flip it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(images)

    def forward_with_input_grad(self, images: Tensor) -> Tensor:
        """The same frozen, eval-mode forward, but recorded by autograd, so a loss on its output reaches
        `images` (a data-free generator trains through the teacher); the weights still get no gradient."""
        return self.model(images)


def _strip_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """(state_dict, build spec or None) from any supported file, loaded with `weights_only=True`.

    Accepts a Lightning checkpoint written by a kd_lightning scheme (student weights), a file written
    by `kd-export`, a `{"model": state_dict}` file (RepDistiller's teachers), or a plain state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"Teacher checkpoint {str(path)!r} does not exist. Train one with `kd-train scheme=supervised "
            f"distill=[] student=<model>` (its checkpoints land in the run directory), or set "
            f"teacher.checkpoint=null to train and cache the teacher automatically."
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a pickle with code in it, or not a torch file at all
        raise ConfigError(
            f"Could not load {str(path)!r} as weights ({type(error).__name__}: {str(error).splitlines()[0]}). "
            f"Checkpoints are read with weights_only=True for safety; re-save the model's state_dict with "
            f"torch.save(model.state_dict(), path) or export it with `kd-export`."
        ) from error
    if not isinstance(content, Mapping):
        raise ConfigError(f"{str(path)!r} holds a {type(content).__name__}, not a state_dict. Save "
                          f"model.state_dict() instead of the model object.")
    if content.get("format") == EXPORT_FORMAT:
        return dict(content["state_dict"]), dict(content["spec"])
    if content.get("format") == STAGE_FORMAT:
        products = content["products"]
        if len(products) != 1:
            raise ConfigError(f"{str(path)!r} holds the networks {sorted(products)} of one stage; a teacher file "
                              f"holds one network. Export the one you want with `kd-export`.")
        product = next(iter(products.values()))
        return dict(product["state_dict"]), dict(product["spec"])
    if CHECKPOINT_KEY in content and "state_dict" in content:
        return _strip_prefix(content["state_dict"], "student."), dict(content[CHECKPOINT_KEY]["student"])
    for key in ("state_dict", "model"):
        if isinstance(content.get(key), Mapping):
            content = content[key]
            break
    state_dict = dict(content)
    for prefix in ("module.", "model.", "student."):
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = _strip_prefix(state_dict, prefix)
    return state_dict, None


def load_weights(model: nn.Module, path: str | os.PathLike, role: str = "teacher") -> nn.Module:
    """Load weights into `model`, refusing a file of another architecture or class count with the fix."""
    state_dict, spec = read_weights(path)
    expected = getattr(model, "kd_spec", None)
    if spec and expected:
        if spec.get("input", expected.get("input")) != expected.get("input") or spec.get("in_channels") != expected.get(
                "in_channels"):
            trained_on = spec.get("input") or "the data's one input"
            raise ConfigError(
                f"The {role} checkpoint {str(path)!r} was trained on input {trained_on!r} "
                f"({spec.get('in_channels')} channels or features), but this run's {role} reads "
                f"{expected.get('input') or 'the data’s one input'!r} ({expected.get('in_channels')}). A network "
                f"trained on one modality or shape cannot read another: set inputs.{role}={spec.get('input') or '<that input>'}"
                f" (with the data set it was trained on), or point {role}.checkpoint at a checkpoint trained on "
                f"{expected.get('input') or 'this input'}."
            )
        for key in ("name", "num_classes", "in_channels"):
            if key in spec and spec[key] != expected[key]:
                raise ConfigError(
                    f"The {role} checkpoint {str(path)!r} was trained as {key}={spec[key]!r}, but the config asks "
                    f"for {key}={expected[key]!r}. Set {role}={spec.get('name')} (and the matching data set), or "
                    f"point {role}.checkpoint at a checkpoint of {expected.get('name')}."
                )
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    mismatched = [key for key, value in state_dict.items() if key in own and own[key].shape != value.shape]
    if missing or unexpected or mismatched:
        name = expected["name"] if expected else type(model).__name__
        raise ConfigError(
            f"The {role} checkpoint {str(path)!r} does not fit model {name!r}: {len(missing)} missing keys (e.g. "
            f"{missing[:2]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:2]}), {len(mismatched)} shape "
            f"mismatches (e.g. {mismatched[:2]}). It was saved from another architecture or class count: set "
            f"{role}=<the architecture it was trained as> and the data set it was trained on, or choose the right "
            f"checkpoint."
        )
    model.load_state_dict(state_dict)
    return model


def recipe_key(recipe: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able recipe (model spec, data, optimisation, seed)."""
    blob = json.dumps(recipe, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def export_student(model: nn.Module, path: str | os.PathLike, metrics: Mapping[str, float] | None = None) -> Path:
    """Write a model alone (no teacher, no adapters) with the spec that rebuilds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": EXPORT_FORMAT, "spec": dict(model.kd_spec), "state_dict": model.state_dict(),
               "metrics": dict(metrics or {})}
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic, so a concurrent sweep never reads a half-written teacher
    return path


def save_products(networks: Mapping[str, nn.Module], path: str | os.PathLike,
                  metrics: Mapping[str, float] | None = None) -> Path:
    """Write a stage's trained networks (by role) with the specs that rebuild them, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": STAGE_FORMAT, "metrics": dict(metrics or {}),
               "products": {role: {"spec": dict(getattr(network, "kd_spec", {})), "state_dict": network.state_dict()}
                            for role, network in networks.items()}}
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a concurrent sweep job never reads a half-written file
    return path


def load_products(networks: Mapping[str, nn.Module], path: str | os.PathLike) -> None:
    content = torch.load(path, map_location="cpu", weights_only=True)
    if set(content.get("products", {})) != set(networks):
        raise ConfigError(f"The cached stage {str(path)!r} holds {sorted(content.get('products', {}))}, but the stage "
                          f"trains {sorted(networks)}. Delete the file to train the stage again.")
    for role, network in networks.items():
        network.load_state_dict(content["products"][role]["state_dict"])


def read_metrics(path: str | os.PathLike) -> dict[str, float]:
    content = torch.load(path, map_location="cpu", weights_only=True)
    return dict(content.get("metrics", {}))
