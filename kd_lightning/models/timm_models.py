"""Any timm model as `timm:<name>`, with weights only from local files.

As for torchvision models, nothing is ever downloaded: the model is built with `pretrained=False`, and
`weights` names a local `.safetensors` / `.pth` / `.bin` state_dict, or `hub` for the copy already in the
local Hugging Face hub cache (what `HF_HUB_OFFLINE=1` would find). The model's own constructor options
(`img_size`, `patch_size`, `embed_dim`, `depth`, `num_heads`, `drop_path_rate`, ...) pass straight through.

Taps: vision transformers (anything with `blocks`, `num_prefix_tokens` and a patch grid: ViT, DeiT with its
distillation token, DINOv2, register ViTs) declare `stage1..N` as evenly spaced blocks, whose B×N×C tokens
`FeatureTaps` reads as maps through the recorded `kd_token_layout`; CNNs declare their `feature_info` stages.
"""

from __future__ import annotations

import difflib
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.taps import INPUT_SUFFIX, Taps
from kd_lightning.tokens import LAYOUT_ATTRIBUTE

log = logging.getLogger(__name__)

# `weights: hub` reads the model's default pretrained tag from the local Hugging Face hub cache.
HUB_WEIGHTS = "hub"
# Prefixes training wrappers put before every key (DDP, Lightning modules, EMA wrappers).
WRAPPER_PREFIXES = ("module.", "model.", "student.", "ema.")
# ViT stages: at most this many evenly spaced blocks (the CNN convention of four stages).
MAX_VIT_STAGES = 4


def available_models() -> list[str]:
    import timm

    return timm.list_models()


def build_timm_model(name: str, num_classes: int, in_channels: int = 3, weights: str | None = None,
                     **kwargs: Any) -> nn.Module:
    """Build timm model `name` with random weights, then load `weights` (a local file or `hub`) if given."""
    import timm

    valid = available_models()
    if name not in valid:
        raise ConfigError(_unknown_message(name, valid))
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except TypeError as error:
        raise ConfigError(f"timm model {name!r} could not be built with arguments {kwargs}: {error}. Remove or rename "
                          f"the unexpected keyword in the model's config (the options are the model class's "
                          f"constructor arguments, e.g. img_size, patch_size, depth, drop_path_rate).") from error
    if weights is not None:
        path = hub_cache_file(name, model) if str(weights) == HUB_WEIGHTS else Path(weights)
        load_timm_weights(model, path, name)
    declare_timm_taps(model)
    return model


# ---------------------------------------------------------------- weights


def hub_cache_file(name: str, model: nn.Module) -> Path:
    """The model's default weights in the local Hugging Face hub cache; never downloads."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")
    if not repo:
        raise ConfigError(f"timm model {name!r} names no Hugging Face hub repository for its weights, so weights=hub "
                          f"has nothing to look up. Set weights to the path of a local .safetensors or .pth file.")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    raise ConfigError(f"The weights of timm model {name!r} ({repo}) are not in the local Hugging Face hub cache "
                      f"({constants.HF_HUB_CACHE}) and kd_lightning never downloads. On a machine with internet run "
                      f"`huggingface-cli download {repo} model.safetensors` and copy its hub cache folder "
                      f"models--{repo.replace('/', '--')} into {constants.HF_HUB_CACHE} (set HF_HUB_CACHE to move "
                      f"it), or "
                      f"set weights to the path of the downloaded file.")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state_dict from a .safetensors file or a torch file (plain, or under `state_dict` / `model`)."""
    if not path.is_file():
        raise ConfigError(f"The weights file {str(path)!r} does not exist and kd_lightning never downloads. Put the "
                          f"model's .safetensors (or .pth/.bin state_dict) file there, e.g. model.safetensors from its "
                          f"Hugging Face repository, or set weights to the path where it is, or to null for random "
                          f"init.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            content: Any = load_file(str(path), device="cpu")
        else:
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated file, a pickle with code in it, another format
        raise ConfigError(f"Could not read {str(path)!r} as weights ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}). Give a .safetensors file or a torch "
                          f"file holding a state_dict (read with weights_only=True); copy it again if it is "
                          f"truncated.") from error
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(content, Mapping) and isinstance(content.get(key), Mapping):
            content = content[key]
            break
    if not isinstance(content, Mapping):
        raise ConfigError(f"{str(path)!r} holds a {type(content).__name__}, not a state_dict. Save "
                          f"model.state_dict() (torch.save or safetensors.torch.save_file).")
    state_dict = {key: value for key, value in content.items() if isinstance(value, Tensor)}
    for prefix in WRAPPER_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def load_timm_weights(model: nn.Module, path: Path, name: str) -> None:
    """Load a state_dict file into `model`: timm's own conversion for the architecture (original-repo key
    names, position embeddings resized to this img_size), the first convolution adapted to `in_chans`, and a
    classifier of another class count left at its fresh initialisation (the backbone is what transfers)."""
    state_dict = read_state_dict(path)
    module = sys.modules.get(type(model).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None)
    if convert is not None:
        try:
            state_dict = convert(state_dict, model)
        except Exception as error:  # a file of another architecture fails inside timm's converter
            raise ConfigError(f"The weights file {str(path)!r} does not fit timm model {name!r} "
                              f"({type(error).__name__}: {error}). It was saved from another architecture: choose the "
                              f"file of {name!r}, or the model name and options (depth, embed_dim, patch_size, ...) it "
                              f"was saved from.") from error
    own = model.state_dict()
    config = getattr(model, "pretrained_cfg", None) or {}
    _adapt_first_conv(state_dict, own, config.get("first_conv"))
    heads = config.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    # A headless file (DINOv2, num_classes=0 exports) or another class count: the backbone is what transfers.
    fresh_head = [key for key in own if key.split(".")[0] in heads
                  and (key not in state_dict or state_dict[key].shape != own[key].shape)]
    for key in fresh_head:
        state_dict.pop(key, None)
    if fresh_head:
        log.info("timm %s: %s has no classifier for %d classes (%s); loaded the backbone, the head keeps its fresh "
                 "initialisation.", name, path.name, getattr(model, "num_classes", 0), ", ".join(fresh_head))
    missing = [key for key in own if key not in state_dict and key not in fresh_head]
    unexpected = [key for key in state_dict if key not in own]
    mismatched = [key for key, value in state_dict.items() if key in own and own[key].shape != value.shape]
    if missing or unexpected or mismatched:
        raise ConfigError(
            f"The weights file {str(path)!r} does not fit timm model {name!r}: {len(missing)} missing keys (e.g. "
            f"{missing[:2]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:2]}), {len(mismatched)} shape "
            f"mismatches (e.g. {mismatched[:2]}). It was saved from another architecture or configuration: set the "
            f"model name and options (depth, embed_dim, patch_size, ...) it was saved from, or choose its file.")
    model.load_state_dict(state_dict, strict=False)


def _adapt_first_conv(state_dict: dict[str, Tensor], own: Mapping[str, Tensor], first_conv: Any) -> None:
    """RGB filters of the file summed or repeated to the model's input channels, as timm does for `in_chans`."""
    if not isinstance(first_conv, str):
        return
    key = f"{first_conv}.weight"
    if key in state_dict and key in own and state_dict[key].dim() == 4 \
            and state_dict[key].shape[1] != own[key].shape[1]:
        from timm.models import adapt_input_conv

        state_dict[key] = adapt_input_conv(own[key].shape[1], state_dict[key])


# ---------------------------------------------------------------- taps and input size


def is_vision_transformer(model: nn.Module) -> bool:
    patch_embed = getattr(model, "patch_embed", None)
    return (isinstance(getattr(model, "blocks", None), (nn.ModuleList, nn.Sequential))
            and hasattr(model, "num_prefix_tokens") and getattr(patch_embed, "grid_size", None) is not None)


def vit_stage_blocks(depth: int) -> list[int]:
    """Evenly spaced blocks ending at the last: depth 12 → 2, 5, 8, 11; depth ≤ 4 → every block."""
    count = min(MAX_VIT_STAGES, depth)
    return [(k + 1) * depth // count - 1 for k in range(count)]


def declare_timm_taps(model: nn.Module) -> None:
    if is_vision_transformer(model):
        _declare_vit_taps(model)
        return
    stages = [info["module"] for info in getattr(model, "feature_info", None) or []
              if isinstance(info, Mapping) and "module" in info]
    if not stages:
        return  # the generic `penultimate` (input of the last Linear) still applies
    points: dict[str, str] = {}
    # timm lists a stride-2 stem (ResNet's act1) before the four stages; it is the `stem`, not stage 1.
    if len(stages) > MAX_VIT_STAGES and model.feature_info[0].get("reduction", 0) < 4:
        points["stem"] = stages.pop(0)
    names = [f"stage{k}" for k in range(1, len(stages) + 1)]
    points.update(zip(names, stages))
    classifier = _classifier_path(model)
    if classifier:
        points["penultimate"] = classifier + INPUT_SUFFIX
    model.declared_taps = partial(Taps, points=points, stages=tuple(names))


def _declare_vit_taps(model: nn.Module) -> None:
    """Stages are block outputs (the residual stream). Nothing rectifies it after the residual sum, so a
    block's output is also its pre-activation tap (`stageK_pre`, read by OFD, AB, ReviewKD)."""
    blocks = vit_stage_blocks(len(model.blocks))
    names = [f"stage{k}" for k in range(1, len(blocks) + 1)]
    points = {name: f"blocks.{index}" for name, index in zip(names, blocks)}
    if isinstance(getattr(model, "norm_pre", None), nn.Module):
        # The tokens entering the first block (patch embeddings, prefix tokens, position embedding): the stem.
        points["stem"] = "norm_pre"
    points.update({f"{name}_pre": f"blocks.{index}" for name, index in zip(names, blocks)})
    classifier = _classifier_path(model)
    if classifier:
        points["penultimate"] = classifier + INPUT_SUFFIX
    model.declared_taps = partial(Taps, points=points, stages=tuple(names))
    grid = tuple(int(size) for size in model.patch_embed.grid_size)
    setattr(model, LAYOUT_ATTRIBUTE, {
        "num_prefix": int(model.num_prefix_tokens), "grid": grid,
        "img_size": tuple(int(size) for size in model.patch_embed.img_size),
        "patch_size": tuple(int(size) for size in model.patch_embed.patch_size),
        "dynamic": bool(getattr(model, "dynamic_img_size", False)),
    })


def _classifier_path(model: nn.Module) -> str | None:
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    head = heads if isinstance(heads, str) else (heads[0] if heads else None)
    modules = dict(model.named_modules())
    # A model built with num_classes=0 has an Identity head: its input is still the pooled embedding.
    return head if head in modules else None


def check_input_size(model: nn.Module, image_size: tuple[int, int], role: str = "student") -> None:
    """Refuse, before anything runs, a ViT whose img_size / patch_size does not fit the data's images.
    `role` names the network in the message (a student's options are `student.*`, a teacher's
    `teacher.model.*`)."""
    layout = getattr(model, LAYOUT_ATTRIBUTE, None)
    if layout is None:
        return
    node = "teacher.model" if role.startswith("teacher") else "student"
    name = (getattr(model, "kd_spec", None) or {}).get("name", type(model).__name__)
    height, width = (int(size) for size in image_size)
    patch_h, patch_w = layout["patch_size"]
    if height % patch_h or width % patch_w:
        raise ConfigError(f"The {role} {name!r} has patch size {patch_h}×{patch_w}, which does not divide the data's "
                          f"{height}×{width} images. Set {node}.patch_size={_common_divisor(height, width, patch_h)} "
                          f"(a divisor of both) and {node}.img_size={height}.")
    if not layout["dynamic"] and tuple(layout["img_size"]) != (height, width):
        size = height if height == width else f"[{height},{width}]"
        raise ConfigError(f"The {role} {name!r} is built for {layout['img_size'][0]}×{layout['img_size'][1]} images "
                          f"but the data's are {height}×{width}. Set {node}.img_size={size} (its position embedding "
                          f"is sized for it; a weights file's is resized on load), or +{node}.dynamic_img_size=true.")


def _common_divisor(height: int, width: int, wanted: int) -> int:
    return max(d for d in range(1, min(wanted, height, width) + 1) if height % d == 0 and width % d == 0)


def _unknown_message(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=3)
    suggestion = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    from kd_lightning.models import MODELS

    zoo = f" {name!r} is a kd_lightning zoo model: use it without the 'timm:' prefix." if name in MODELS else ""
    return (f"Unknown timm model {name!r}.{suggestion}{zoo} Valid names include 'resnet18', 'convnext_atto', "
            f"'vit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224' ({len(valid)} in all; `timm.list_models()` "
            f"lists them, `timm.list_models('*vit*')` filters).")
