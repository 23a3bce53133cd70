"""One training phase: its Trainer, loggers and callbacks built from the config, then fit and test.

Each stage (and an init phase of its terms) gets its own Trainer and its own loggers, named after it, so a
W&B run, a CSV log and a checkpoint directory each hold exactly one training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kd_lightning.acceleration import accelerate
from kd_lightning.checkpoint_selection import restore_best
from kd_lightning.errors import ConfigError
from kd_lightning.sweeps.identity import sweep_name
from kd_lightning.sweeps.pruning import pruning_callbacks
from kd_lightning.schemes import Supervised
from kd_lightning.stage_build import scheme_kwargs
from kd_lightning.teachers import CHECKPOINT_KEY

GPU_ACCELERATORS = {"gpu", "cuda"}


def check_accelerator(trainer_cfg: DictConfig) -> None:
    if str(trainer_cfg.get("accelerator", "cpu")) in GPU_ACCELERATORS and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={trainer_cfg.accelerator} asks for a CUDA GPU, but torch sees none on this "
            f"machine (torch {torch.__version__}, CUDA available: False). Run with trainer=cpu, or install a CUDA "
            f"build of torch on a machine with an NVIDIA GPU."
        )


def build_loggers(cfg: DictConfig, phase: str, ckpt_path: str | None = None) -> list:
    loggers = []
    for key, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None:
            continue
        target = str(logger_cfg.get("_target_", ""))
        overrides: dict[str, Any] = {}
        if target.endswith("WandbLogger"):
            run_name = logger_cfg.get("name") or f"{cfg.get('task_name', 'train')}/{Path(cfg.paths.output_dir).name}"
            # A sweep's runs share one group (the sweep's), so W&B compares its jobs side by side.
            group = logger_cfg.get("group") or sweep_name() or run_name
            overrides = {"name": f"{run_name}-{phase}", "group": group, "job_type": phase}
            if ckpt_path and not logger_cfg.get("id") and (run_id := resumed_wandb_run_id(ckpt_path)):
                overrides["id"] = run_id  # the resumed training continues its W&B run instead of starting one
        elif "name" in logger_cfg or target.endswith(("CSVLogger", "TensorBoardLogger")):
            overrides = {"name": f"{logger_cfg.get('name') or key}/{phase}"}
        loggers.append(instantiate(logger_cfg, **overrides))
    return loggers


def resumed_wandb_run_id(ckpt_path: str) -> str | None:
    """The W&B run id recorded in the checkpoint being resumed (see DistillationModule.on_save_checkpoint)."""
    return checkpoint_record(ckpt_path).get("wandb_run_id")


def checkpoint_record(ckpt_path: str) -> dict[str, Any]:
    """What a kd_lightning scheme recorded in its checkpoint (stage, W&B run id, RNG states)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return dict(checkpoint.get(CHECKPOINT_KEY, {}))


def build_callbacks(cfg: DictConfig, has_logger: bool) -> list:
    callbacks = []
    for callback_cfg in (cfg.get("callbacks") or {}).values():
        if callback_cfg is None:
            continue
        target = str(callback_cfg.get("_target_", ""))
        if target.endswith("LearningRateMonitor") and not has_logger:
            continue  # it would refuse to run; with logger=none there is nothing to monitor into
        if target.endswith("ProgressBar") and cfg.trainer.get("enable_progress_bar") is False:
            continue  # the trainer refuses a progress bar callback when bars are switched off
        callbacks.append(instantiate(callback_cfg))
    return callbacks


def fit_and_test(cfg: DictConfig, module: L.LightningModule, datamodule: Any, phase: str,
                 max_epochs: int | None = None, test: bool = True,
                 ckpt_path: str | None = None) -> tuple[dict[str, float], L.Trainer]:
    loggers = build_loggers(cfg, phase, ckpt_path)
    callbacks = build_callbacks(cfg, bool(loggers)) + pruning_callbacks(cfg, phase)  # [] outside a pruned search
    trainer_overrides: dict[str, Any] = {"logger": loggers or False, "callbacks": callbacks,
                                         "default_root_dir": str(Path(cfg.paths.output_dir) / phase)}
    if max_epochs is not None:
        trainer_overrides["max_epochs"] = max_epochs
    trainer: L.Trainer = instantiate(cfg.trainer, **trainer_overrides)
    accelerate(module, trainer.strategy.root_device, cfg)
    if loggers:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    # Read before testing: `trainer.test` replaces the callback metrics, and `val/acc` is the search objective.
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/acc")}
    if test and cfg.get("test_weights", "last") == "best":  # not after an init phase: the main phase follows
        metrics.update(restore_best(trainer, module))
    if test and cfg.get("evaluate_test", True):
        trainer.test(module, datamodule=datamodule, verbose=False)
        metrics.update({key: float(value) for key, value in trainer.callback_metrics.items()
                        if key.startswith("test/")})
    _finish_wandb(loggers)
    return metrics, trainer


def _finish_wandb(loggers: list) -> None:
    # Sweeps run many jobs in one process: each W&B run must be closed before the next one opens.
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


def evaluate(cfg: DictConfig, model: torch.nn.Module, datamodule: Any, phase: str = "teacher") -> dict[str, float]:
    if not cfg.get("evaluate_test", True):
        return {}
    module = Supervised(model, **scheme_kwargs(cfg, datamodule))
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False,
                          default_root_dir=str(Path(cfg.paths.output_dir) / phase))
    trainer.test(module, datamodule=datamodule, verbose=False)
    return {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("test/")}
