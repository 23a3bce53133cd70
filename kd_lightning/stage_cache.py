"""The stage cache: a trained stage's products in `paths.cache_dir/stages/<stage>-<models>-<key>.pt`.

The key hashes what decides the stage's trained weights (`stage_recipe`), including the keys of the stages
it learns from, so a sweep over students, methods or seeds trains each teacher once and a changed teacher
recipe invalidates everything downstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_lightning.checkpoint_selection import weight_choice_recipe
from kd_lightning.stages import Stage
from kd_lightning.teacher_cache import cache_options


def stage_recipe(stage_cfg: DictConfig, stage: Stage, teacher_keys: dict[str, str]) -> dict[str, Any]:
    """What decides a stage's trained weights (its cache key), including the keys of the stages it learns from."""
    trainer = OmegaConf.to_container(stage_cfg.trainer, resolve=True)
    for irrelevant in ("default_root_dir", "log_every_n_steps", "enable_progress_bar", "enable_model_summary",
                       "devices", "num_nodes", "strategy"):
        trainer.pop(irrelevant, None)
    data = OmegaConf.to_container(stage_cfg.data, resolve=True)
    for irrelevant in ("num_workers", "pin_memory", "root", "system_dir"):
        data.pop(irrelevant, None)
    scheduler = stage_cfg.get("scheduler")
    recipe = {"scheme": dict(stage.scheme), "networks": dict(stage.networks), "distill": dict(stage.distill or {}),
              "seed": stage.seed, "data": data, "trainer": trainer,
              "optimizer": OmegaConf.to_container(stage_cfg.optimizer, resolve=True),
              "scheduler": OmegaConf.to_container(scheduler, resolve=True) if scheduler else None,
              "teachers": {name: teacher_keys[name] for name in stage.teacher_names()},
              **weight_choice_recipe(stage_cfg)}
    cache = cache_options(stage_cfg)
    if stage.teachers and cache is not None and not cache.lossless:
        recipe["teacher_outputs"] = cache.dtype  # rounded teacher outputs train a (slightly) different network
    return recipe


def stage_file(cfg: DictConfig, stage: Stage, key: str) -> Path:
    models = stage.model_names().replace(", ", "+").replace(":", "_")
    return Path(cfg.paths.cache_dir) / "stages" / f"{stage.name}-{models}-{key}.pt"
