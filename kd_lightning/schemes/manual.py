"""Manual optimisation with several optimizers where only one of them counts as a training step.

Lightning's `global_step` counts every `LightningOptimizer.step()` of every optimizer (Lightning #17958),
so a scheme stepping a generator beside its student would run `max_steps`, `every_n_train_steps`, logging
cadences and step schedules up to twice as fast. Stepping the secondary optimizers through the strategy
directly (the same precision-plugin path, gradient scaler included, without the step counter) keeps
`global_step` equal to the number of student steps.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.core.optimizer import LightningOptimizer, do_nothing_closure


def uncounted_step(module: L.LightningModule, optimizer: LightningOptimizer) -> None:
    """`optimizer.step()` that does not advance `global_step` (for generators, discriminators)."""
    module.trainer.strategy.optimizer_step(optimizer.optimizer, do_nothing_closure, model=module)


def step_schedulers(module: L.LightningModule, interval: str) -> None:
    """Step by hand (manual optimisation steps none) every scheduler configured with `interval`
    ("step": call after each counted step; "epoch": at each epoch's end)."""
    for config in module.trainer.lr_scheduler_configs:
        if config.interval == interval:
            config.scheduler.step()


def scheduler_configs(optimizers: list[Any], factory: Any, interval: str) -> list[dict[str, Any]]:
    """`configure_optimizers`' scheduler entries: the same schedule for each optimizer (None: none)."""
    if factory is None:
        return []
    return [{"scheduler": factory(optimizer), "interval": interval} for optimizer in optimizers]
