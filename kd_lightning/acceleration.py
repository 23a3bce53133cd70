"""GPU speed switches of a fit, which leave CPU runs as they are (`channels_last`, `compile` in train.yaml).

* `channels_last`: on CUDA devices the networks' 4-D weights and their inputs are NHWC, the layout cuDNN's
  fastest convolutions (tensor cores under bf16) take; a no-op elsewhere.
* `compile.student` / `compile.teacher`: `nn.Module.compile` of the networks the scheme trains (its
  products) and of its frozen teachers, in place, so parameter names, checkpoints and exports are unchanged.
  The teachers live outside the module tree (see `FrozenTeacher`), so they are found among its attributes.

`torch.backends.cudnn.benchmark` and bf16-mixed are trainer settings (`conf/trainer/gpu.yaml`).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.teachers import FrozenTeacher

COMPILE_OPTIONS = {"student", "teacher", "backend", "mode"}


def frozen_teachers(module: nn.Module) -> list[FrozenTeacher]:
    """The frozen teachers a scheme holds outside its module tree (one, or lists of them: multi-teacher)."""
    found: dict[int, FrozenTeacher] = {}
    for value in vars(module).values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, FrozenTeacher):
                found[id(item)] = item
    return list(found.values())


def _inputs_channels_last(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def use_channels_last(network: nn.Module) -> None:
    network.to(memory_format=torch.channels_last)
    if not getattr(network, "_kd_channels_last", False):  # each fit of a stage calls this again
        network.register_forward_pre_hook(_inputs_channels_last)
        network._kd_channels_last = True


def compile_once(network: nn.Module, backend: str, mode: str | None) -> None:
    if getattr(network, "_compiled_call_impl", None) is None:
        network.compile(backend=backend, mode=mode)


def accelerate(module: nn.Module, device: torch.device, cfg: DictConfig) -> None:
    """Apply the run's speed switches to `module` before it is fitted on `device`."""
    options = dict(cfg.get("compile") or {})
    unknown = sorted(set(options) - COMPILE_OPTIONS)
    if unknown:
        raise ConfigError(f"compile has no option {unknown}; its options are {sorted(COMPILE_OPTIONS)} (e.g. "
                          f"compile.student=true compile.teacher=true compile.mode=max-autotune).")
    networks = list(module.products().values()) if hasattr(module, "products") else [module]
    teachers = [teacher.model for teacher in frozen_teachers(module)]
    if device.type == "cuda" and cfg.get("channels_last", True):
        for network in networks + teachers:
            use_channels_last(network)
    backend, mode = str(options.get("backend") or "inductor"), options.get("mode")
    chosen: list[Any] = (networks if options.get("student") else []) + (teachers if options.get("teacher") else [])
    for network in chosen:
        compile_once(network, backend, mode)


__all__ = ["accelerate", "frozen_teachers"]
