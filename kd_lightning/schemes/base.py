"""The shared base of every scheme: metrics, logging names, optimizers, checkpoint contents."""

from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from kd_lightning.errors import ConfigError
from kd_lightning.rng import collect_rng_states, restore_rng_states
from kd_lightning.schemes.watch import NonFiniteWatch
from kd_lightning.teachers import CHECKPOINT_KEY

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """(images, targets, indices); indices are None for data modules that yield plain (x, y) pairs. A
    kd_lightning batch also carries each sample's augmentation view (`batch_views`)."""
    if len(batch) in (3, 4):
        return batch[0], batch[1], batch[2]
    if len(batch) == 2:
        return batch[0], batch[1], None
    raise ConfigError(
        f"A batch must be (images, targets), (images, targets, indices) or (images, targets, indices, views); got "
        f"{len(batch)} elements. Use a kd_lightning data module or make your dataset return one of those tuples."
    )


def batch_views(batch: Any) -> Tensor | None:
    """Each sample's augmentation view (`KDDataModule.train_views`), None for batches that do not carry one."""
    return batch[3] if len(batch) == 4 else None


# The target of a training sample whose label the run hides (`labeled_fraction`): F.cross_entropy's ignore_index.
UNLABELED = -100


def labeled_subset(targets: Tensor, fraction: float, seed: int) -> Tensor:
    """A boolean mask over the training split: `fraction` of each class's samples (at least one), chosen by a
    permutation seeded by `seed` (the data's, so every job of a sweep hides the same labels)."""
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(targets), generator=generator)
    mask = torch.zeros(len(targets), dtype=torch.bool)
    for label in targets.unique():
        members = order[targets[order] == label]
        mask[members[:max(1, round(fraction * len(members)))]] = True
    return mask


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    metrics = {"acc": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes > 10:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


class DistillationModule(L.LightningModule):
    """Holds the trained network (`self.student`) and everything every scheme shares.

    `trains_on_mixed_batches`: whether `training_losses` takes a mixed batch (`data.mixup_alpha`/`cutmix_alpha`),
    whose targets are B×K class probabilities: F.cross_entropy reads them as such, and `DistillInputs` hands terms
    each sample's dominant class. Schemes whose losses read one label per sample in their own way (CS-KD's class
    pairs, Tf-KD's regulariser, KDCL's min-logit ensemble, data-free steps) keep False and are refused up front.

    Logged names: `train/loss`, `train/<term>` (weighted), `val/acc`, `val/acc_best`, `test/acc`
    (plus `*_top5` when there are more than 10 classes); the progress bar shows the training loss as
    `loss`, refreshed at logging steps only. Optimizers see trainable parameters only.
    The checkpoint records the student's build spec so `kd_lightning.export` can extract it alone.
    """

    trains_on_mixed_batches: ClassVar[bool] = False

    # Whether a batch without labels still has a loss (distillation terms read every sample): with labels hidden
    # (`labeled_fraction`), a scheme that learns from labels alone skips such batches.
    learns_without_labels: bool = True

    def __init__(self, student: nn.Module, num_classes: int, optimizer: OptimizerFactory,
                 scheduler: SchedulerFactory | None = None, scheduler_interval: str = "epoch") -> None:
        super().__init__()
        self.student = student
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.val_metrics = accuracy_metrics(num_classes, "val/")
        self.test_metrics = accuracy_metrics(num_classes, "test/")
        self.val_acc_best = MaxMetric()
        # Set by the pipeline: the stage this module trains, recorded in checkpoints for `ckpt_path=`.
        self.stage_name: str | None = None
        # Schemes that watch their losses for NaN/inf set this; the base reads it where reading is free.
        self.nonfinite: NonFiniteWatch | None = None
        self._resumed_rng_states: dict[str, Any] | None = None
        # Which training samples keep their label (`labeled_fraction` < 1; schemes that take `labeled`): a
        # non-persistent buffer, so it follows the module to the device and stays out of checkpoints.
        self.register_buffer("labeled", None, persistent=False)

    def hide_labels(self, labeled: Tensor | None) -> None:
        """Train with the labels of the samples outside `labeled` hidden: their CE is left out (`cross_entropy`);
        every other loss still reads them (semi-supervised distillation, supervision transfer's setting)."""
        self.labeled = None if labeled is None else labeled.bool()

    def cross_entropy(self, logits: Tensor, targets: Tensor, **options: Any) -> Tensor:
        """The CE of the labeled samples: the mean over those of the batch (0 for a batch without any)."""
        if self.labeled is None:
            return F.cross_entropy(logits.float(), targets, **options)
        known = (targets != UNLABELED).sum()
        return F.cross_entropy(logits.float(), targets, reduction="sum", **options) / known.clamp_min(1)

    def forward(self, images: Tensor) -> Tensor:
        return self.student(images)

    def check_mixed_batches(self) -> None:
        """Refuse mixed training batches (mixup/CutMix) this scheme cannot train on; called before training."""
        if not self.trains_on_mixed_batches:
            raise ConfigError(
                f"data.mixup_alpha / data.cutmix_alpha mix every training batch into soft targets (class "
                f"probabilities), but scheme {type(self).__name__} reads one hard label per sample in its own losses "
                f"(or trains on no real batches). Set data.mixup_alpha=0 data.cutmix_alpha=0, or mix with a scheme "
                f"that takes soft targets: supervised, offline, multi_teacher, mlkd, adversarial, mean_teacher, dml, "
                f"byot, deit.")

    def products(self) -> dict[str, nn.Module]:
        """The trained networks later stages read as teachers and the run exports, by role."""
        return {"student": self.student}

    @property
    def init_epochs(self) -> int:
        """Epochs of a preliminary fit before the main one (terms' initialisation stages); 0: none."""
        return 0

    def set_init_stage(self, active: bool) -> None:
        """Switch between the preliminary fit and the main one (see `init_epochs`)."""
        if active:
            raise ConfigError(f"{type(self).__name__} has no initialisation stage.")

    def training_losses(self, images: Tensor, targets: Tensor, indices: Tensor | None) -> dict[str, Tensor]:
        """Named, already weighted losses for one batch; `train/loss` is their sum."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_losses()")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, targets, indices = unpack_batch(batch)
        if self.labeled is not None:
            if indices is None:
                raise ConfigError("labeled_fraction < 1 hides labels by training-sample index, but the batches carry no "
                                  "indices. Use a kd_lightning data module, or labeled_fraction=1.")
            targets = targets.masked_fill(~self.labeled[indices], UNLABELED)
            if not self.learns_without_labels and not self._any_labeled(targets):
                # Nothing to learn from: no step at all, rather than one that moves the weights by momentum and
                # weight decay alone (which, at a few labels per batch, wrecks a label-only baseline).
                return None
        return self.log_training_losses(self.training_losses(images, targets, indices), len(targets))

    def _any_labeled(self, targets: Tensor) -> bool:
        """Whether any rank's batch has a labeled sample (all ranks then step, or none: DDP stays in step). The
        answer is read back from the device, one wait per step, and only a label-only scheme with labels hidden
        asks: skipping a step is a host decision."""
        known = (targets != UNLABELED).sum().float()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            known = trainer.strategy.reduce(known, reduce_op="sum")
        return bool(known > 0)

    def log_training_losses(self, losses: dict[str, Tensor], batch_size: int) -> Tensor:
        """Logs `train/loss` (returned: the sum of `losses`) and each named loss; shared by manual-optimisation
        schemes, whose training_step steps the optimizers itself."""
        total = torch.stack([loss.float() for loss in losses.values()]).sum()
        if not self.training_values_read():
            return total
        self.log("train/loss", total, batch_size=batch_size)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        if self.is_logging_step():
            # Lightning turns progress-bar values into Python numbers after every batch, which waits for the
            # device; a host copy taken only when the loggers write anyway keeps the other steps asynchronous.
            self.log("loss", total.detach().cpu(), prog_bar=True, logger=False, batch_size=batch_size)
        return total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Reading the flags waits for the device, so it happens only where the loggers wait anyway, and before
        # the epoch's validation and checkpoint; the error still names the first step that went wrong.
        if self.nonfinite is not None and (self.is_logging_step()
                                           or batch_idx + 1 >= self.trainer.num_training_batches):
            self.nonfinite.raise_if_any()

    def training_values_read(self) -> bool:
        """Whether anything reads this step's training values: the loggers write them at logging steps only
        (a step-level value logged in between is replaced unread by the next), and callbacks read
        `callback_metrics` after the epoch's last batch and the fit's last step. Skipping `self.log` elsewhere
        matters for small networks: each call runs Lightning's bookkeeping in Python, one per loss, which was about
        a quarter of the digits ViT's training_step under cProfile (BENCHMARKS.md, "ViT KD step")."""
        trainer = self.trainer
        last_step = 0 < trainer.max_steps <= trainer.global_step + max(1, len(trainer.optimizers))
        return (self.is_logging_step() or last_step or trainer.should_stop
                or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    def is_logging_step(self) -> bool:
        """Whether Lightning writes the loggers after this training batch (every `log_every_n_steps`):
        the steps at which reading a value back from the device costs nothing extra."""
        # The predicate Lightning's logger connector (and its LearningRateMonitor) decides with.
        return bool(self.trainer._logger_connector.should_update_logs or self.trainer.fast_dev_run)

    def _evaluate(self, batch: Any, metrics: MetricCollection, stage: str) -> None:
        images, targets, _ = unpack_batch(batch)
        logits = self.student(images)
        self.log(f"{stage}/loss", F.cross_entropy(logits.float(), targets), batch_size=len(targets))
        metrics.update(logits, targets)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def loss_summary(self) -> str:
        """One line naming the losses this fit trains and their weights, logged when each fit starts."""
        return "loss = 1.0·CE"

    def on_fit_start(self) -> None:
        if self.trainer.is_global_zero:
            log.info(self.loss_summary())

    def on_train_start(self) -> None:
        # The sanity-check validation ran on an untrained student; it must not count as the best epoch.
        self.val_acc_best.reset()
        if self._resumed_rng_states is not None:
            # Restored here, not at load time: the sanity check and loader setup in between draw from them.
            restore_rng_states(self._resumed_rng_states)
            self._resumed_rng_states = None

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.val_metrics.reset()
        self.log_dict(values, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(values["val/acc"])
        self.log("val/acc_best", self.val_acc_best.compute() if self.val_acc_best.update_called else values["val/acc"])

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"student": dict(getattr(self.student, "kd_spec", {})), "stage": self.stage_name,
                                      "rng_states": collect_rng_states(), "wandb_run_id": self._wandb_run_id()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._resumed_rng_states = checkpoint.get(CHECKPOINT_KEY, {}).get("rng_states")

    def _wandb_run_id(self) -> str | None:
        # Recorded so that `ckpt_path=` resumes the same W&B run (see pipeline.build_loggers).
        trainer = self._trainer
        for logger in trainer.loggers if trainer is not None else []:
            if type(logger).__name__ == "WandbLogger":
                return str(logger.version)
        return None

