"""Pruning: a search trial reports its validation metric every epoch and stops when the study's pruner says so.

The trial runs in its own process (a launcher's job), so `ReportToTrial` opens the study through its storage
(kd_lightning/sweeps/study.py) and reports to the trial the sweeper asked for (`hydra.sweeper.trial`). It is
added only to the fit of the run's last stage — the network the search is about; a teacher or baseline trained
on the way would report someone else's accuracy. A pruned trial raises `TrialStopped` out of the fit; `kd-train`
writes `<job>/pruned.json` and returns a `PrunedTrial` to the sweeper, which tells the study PRUNED (not FAIL),
and `kd-report` lists it as pruned.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from kd_lightning.errors import ConfigError

PRUNED_FILE = "pruned.json"
SWEEPER = "hydra_plugins.kd_optuna_sweeper.kd_optuna_sweeper.KDOptunaSweeper"


@dataclass(frozen=True)
class PrunedTrial:
    """What a pruned job returns to the sweeper (pickled across processes by parallel launchers)."""

    trial: int
    epoch: int
    value: float


class TrialStopped(Exception):
    def __init__(self, pruned: PrunedTrial) -> None:
        super().__init__(f"trial {pruned.trial} pruned after epoch {pruned.epoch} ({pruned.value:.4f})")
        self.pruned = pruned


def check_pruning_metric(metric: str, trainer_cfg: Any) -> None:
    """Refuse pruning on a metric that no validation epoch logs, before the first trial."""
    if not metric.startswith("val/"):
        raise ConfigError(f"Pruning (hydra.sweeper.pruner.name) compares trials epoch by epoch on optimized_metric, "
                          f"but {metric} is not logged at the end of every validation epoch: only val/* metrics "
                          f"are (val/acc, val/acc_best, val/loss). Set optimized_metric=val/acc, or "
                          f"hydra.sweeper.pruner.name=none.")
    if trainer_cfg is not None and trainer_cfg.get("limit_val_batches", 1) in (0, 0.0):
        raise ConfigError(f"Pruning on {metric} needs a validation epoch, but trainer.limit_val_batches=0 switches "
                          f"validation off. Remove that setting, or set hydra.sweeper.pruner.name=none.")


def search_trial(cfg: DictConfig) -> dict[str, Any] | None:
    """The sweeper settings of a pruned search's trial job, or None for any other run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweeper = HydraConfig.get().sweeper
    if sweeper.get("_target_") != SWEEPER or sweeper.get("trial") is None:
        return None
    if str((sweeper.get("pruner") or {}).get("name", "none")) == "none":
        return None
    return {"storage": sweeper.storage, "study_name": sweeper.study_name, "trial": int(sweeper.trial)}


def pruning_callbacks(cfg: DictConfig, phase: str) -> list:
    """[ReportToTrial] for the last stage's fit of a trial of a pruned search; [] otherwise."""
    trial = search_trial(cfg)
    if trial is None:
        return []
    from kd_lightning.stages import plan_stages

    if phase != plan_stages(cfg)[-1].name:
        return []
    return [ReportToTrial(monitor=str(cfg.get("optimized_metric") or "val/acc"), **trial)]


class ReportToTrial(L.Callback):
    def __init__(self, storage: str, study_name: str, trial: int, monitor: str) -> None:
        self.storage, self.study_name, self.number, self.monitor = storage, study_name, trial, monitor
        self._trial = None

    def trial(self) -> Any:
        if self._trial is None:
            from kd_lightning.sweeps.study import load_study, open_storage, trial_of

            self._trial = trial_of(load_study(open_storage(self.storage), self.study_name), self.number)
        return self._trial

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        prune, value = False, float("nan")
        if trainer.is_global_zero:  # one process talks to the study; the others follow its decision
            metric = trainer.callback_metrics.get(self.monitor)
            if metric is None:
                logged = sorted(key for key in trainer.callback_metrics if key.startswith("val/"))
                raise ConfigError(f"Pruning reports {self.monitor} (optimized_metric) every epoch, but the "
                                  f"validation epoch logged only {logged}. Set optimized_metric to one of them.")
            value = float(metric)
            trial = self.trial()
            trial.report(value, step=epoch)
            prune = trial.should_prune()
        prune = trainer.strategy.broadcast(prune)
        if prune:
            raise TrialStopped(PrunedTrial(trial=self.number, epoch=epoch, value=value))


def record_pruned(output_dir: Path, record: dict[str, Any], pruned: PrunedTrial) -> None:
    """`<job>/pruned.json`: the job's identity and where the pruner stopped it, for `kd-report`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / PRUNED_FILE).write_text(json.dumps({**record, "pruned": asdict(pruned)}, indent=2))


__all__ = ["PRUNED_FILE", "PrunedTrial", "ReportToTrial", "TrialStopped", "check_pruning_metric",
           "pruning_callbacks", "record_pruned", "search_trial"]
