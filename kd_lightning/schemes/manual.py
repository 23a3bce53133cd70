"""Manual optimisation with several optimizers where only the student's steps count as training steps.

The one mechanism for the schemes that step a second player beside the student (data-free generators,
adversarial discriminators):

* Lightning's `global_step` counts every `LightningOptimizer.step()` of every optimizer (Lightning #17958),
  so a second player would make `max_steps`, `every_n_train_steps`, logging cadences, EMA averaging and step
  schedules run up to (1 + its steps)× fast. `uncounted_step` steps it through the strategy instead (the
  same precision-plugin path, gradient scaler included, without the step counter), so `global_step` equals
  the number of student steps.
* Manual optimisation steps no scheduler. `step_schedulers`, called at the end of `training_step`, steps
  them where automatic optimisation would: step-interval ones after every batch, epoch-interval ones after
  the epoch's last batch — before `on_train_batch_end`, so a step checkpoint taken there already holds the
  stepped schedule (Lightning resumes from such a checkpoint without running the epoch-end hooks).
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.core.optimizer import LightningOptimizer, do_nothing_closure

# Lightning suggests saving a pre-step copy for step checkpoints under manual optimisation; the state after the
# step is what automatic optimisation saves too, and what an exact resume needs.
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps")


def uncounted_step(module: L.LightningModule, optimizer: LightningOptimizer) -> None:
    """`optimizer.step()` that does not advance `global_step` (for generators, discriminators); the
    gradients must already be computed."""
    module.trainer.strategy.optimizer_step(optimizer.optimizer, do_nothing_closure, model=module)


def step_schedulers(module: L.LightningModule) -> None:
    """Step the configured schedulers as automatic optimisation would after this batch; call once at the
    end of each `training_step`."""
    trainer = module.trainer
    progress = trainer.fit_loop.epoch_loop.batch_progress
    # The epoch loop's own end-of-epoch test (`current.ready` is restored on resume, unlike a batch index).
    epoch_ends = progress.current.ready >= trainer.num_training_batches or progress.is_last_batch
    for config in trainer.lr_scheduler_configs:
        if config.interval == "step" or (config.interval == "epoch" and epoch_ends):
            config.scheduler.step()


def scheduler_configs(optimizers: list[Any], factory: Any, interval: str) -> list[dict[str, Any]]:
    """`configure_optimizers`' scheduler entries: the same schedule for each optimizer (None: none)."""
    if factory is None:
        return []
    return [{"scheduler": factory(optimizer), "interval": interval} for optimizer in optimizers]
