"""Which weights a trained stage ends with: its last ones, or the checkpoint its validation ranked best.

`test_weights=best` is model selection on the held-out validation split (data.val_fraction > 0): the monitored
ModelCheckpoint's best file is loaded back into the module after `fit`, so the test, the exported network and
what later stages learn from are those weights, and `val/acc` reports their score rather than the last epoch's.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import ConfigError

CHOICES = ("last", "best")
WEIGHT_AVERAGING = ("EMAWeightAveraging", "WeightAveraging", "StochasticWeightAveraging")


def _callback_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    return {name: node for name, node in (cfg.get("callbacks") or {}).items() if node is not None}  # null: removed


def _monitored_checkpoint_configs(cfg: DictConfig) -> list[DictConfig]:
    return [node for node in _callback_configs(cfg).values()
            if str(node.get("_target_", "")).endswith("ModelCheckpoint") and node.get("monitor")]


def _weight_averaging_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    return {name: node for name, node in _callback_configs(cfg).items()
            if str(node.get("_target_", "")).rsplit(".", 1)[-1] in WEIGHT_AVERAGING}


def check_test_weights(cfg: DictConfig, datamodule: Any) -> None:
    """Refuse a `test_weights` that cannot be honoured, before anything trains."""
    choice = cfg.get("test_weights", "last")
    if choice not in CHOICES:
        raise ConfigError(f"test_weights={choice!r} is not one of {list(CHOICES)}: `last` tests the weights training "
                          f"ended with, `best` the checkpoint with the best monitored validation metric.")
    if choice == "last":
        return
    if not _monitored_checkpoint_configs(cfg):
        raise ConfigError("test_weights=best loads the checkpoint a monitored ModelCheckpoint ranked best, but the "
                          "run's callbacks have none (a ModelCheckpoint with `monitor:` set). Use callbacks=default "
                          "(it monitors val/acc), add one, e.g. "
                          "+callbacks.best=\"{_target_: lightning.pytorch.callbacks.ModelCheckpoint, monitor: val/acc, "
                          "mode: max}\", or set test_weights=last.")
    averaging = _weight_averaging_configs(cfg)
    if averaging:
        raise ConfigError(f"test_weights=best with the weight-averaging callback(s) {sorted(averaging)}: the callback "
                          f"swaps its own running average in for the test and the export, so the best checkpoint "
                          f"loaded after training would not be what is tested. Use one: test_weights=last keeps the "
                          f"average, or drop the callback (e.g. callbacks=default) to keep the best checkpoint.")
    if datamodule.validates_on_test:
        raise ConfigError(f"test_weights=best chooses weights on the validation split, and {type(datamodule).__name__} "
                          f"validates on the test split (data.val_fraction=0), so the reported test accuracy would "
                          f"be chosen on the test set. Set data.val_fraction=0.1 or test_weights=last.")


def restore_best(trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
    """Load the best-ranked checkpoint's weights into `module`; returns {monitored metric: its best value}."""
    callback = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    if callback is None:
        raise ConfigError("test_weights=best needs a ModelCheckpoint with `monitor:` set among the trainer's "
                          "callbacks; use callbacks=default or set test_weights=last.")
    if not callback.best_model_path:
        raise ConfigError(f"test_weights=best found no checkpoint ranked on {callback.monitor}: validation never "
                          f"logged it during training (trainer.check_val_every_n_epoch larger than max_epochs, or "
                          f"trainer.limit_val_batches=0). Let validation run, or set test_weights=last.")
    checkpoint = torch.load(callback.best_model_path, map_location=module.device, weights_only=False)
    module.load_state_dict(checkpoint["state_dict"])
    return {callback.monitor: float(callback.best_model_score)}


def weight_choice_recipe(cfg: DictConfig) -> dict[str, Any]:
    """What, besides the optimisation, decides a stage's final weights: part of its cache key when not default."""
    recipe: dict[str, Any] = {}
    if cfg.get("test_weights", "last") == "best":
        recipe["test_weights"] = "best"
    averaging = {name: OmegaConf.to_container(node, resolve=True)
                 for name, node in _weight_averaging_configs(cfg).items()}
    if averaging:  # an EMA teacher is a different teacher: it must not be served from the plain one's cache
        recipe["weight_averaging"] = averaging
    return recipe
