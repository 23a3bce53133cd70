"""Pruning: a search trial reports its validation metric every epoch and stops when the study's pruner says so.

The trial runs in its own process (a launcher's job), so `ReportToTrial` opens the study through its storage
(kd_lightning/sweeps/study.py) and reports to the trial the sweeper asked for (`hydra.sweeper.trial`). It is
added only to the fit of the run's last stage — the network the search is about; a teacher or baseline trained
on the way would report someone else's accuracy. A pruned trial raises `TrialStopped` out of the fit; `kd-train`
writes `<job>/pruned.json` and returns a `PrunedTrial` to the sweeper (kd_lightning/sweeps/pruned.py), which tells
the study PRUNED (not FAIL), and `kd-report` lists it as pruned.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import ConfigError
from kd_lightning.sweeps.pruned import PrunedTrial, TrialStopped
from kd_lightning.sweeps.study import SWEEPER

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
    return {"storage": sweeper.storage, "study_name": sweeper.study_name, "trial": int(sweeper.trial),
            "pruner": OmegaConf.to_container(sweeper.pruner, resolve=True)}


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
    def __init__(self, storage: str, study_name: str, trial: int, monitor: str, pruner: dict[str, Any]) -> None:
        self.storage, self.study_name, self.number, self.monitor = storage, study_name, trial, monitor
        self.pruner = pruner
        self._trial = None

    def trial(self) -> Any:
        if self._trial is None:
            from kd_lightning.sweeps.study import build_pruner, load_study, open_storage, trial_of

            # Optuna keeps the pruner with the Study object, not in the storage: this process builds the same one.
            study = load_study(open_storage(self.storage), self.study_name, pruner=build_pruner(self.pruner))
            self._trial = trial_of(study, self.number)
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


__all__ = ["ReportToTrial", "pruning_callbacks", "search_trial"]
