"""`hydra/sweeper=kd_optuna`: the project's Optuna sweeper (kd_lightning.sweeps.search.OptunaSearch).

Hydra imports every module under `hydra_plugins` at start-up to find plugins, so this one imports nothing heavy:
Optuna, torch and Lightning load only when a search actually starts.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class KDOptunaSweeper(Sweeper):
    def __init__(self, **settings: Any) -> None:
        from kd_lightning.sweeps.search import OptunaSearch

        self.search = OptunaSearch(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.search.sweep(arguments)
