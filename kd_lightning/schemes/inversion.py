"""Data-free schemes that invert the teacher into a pool: DeepInversion and Fast-Datafree.

Both follow the loop of zju-vipa/DataFree's datafree_kd.py: a synthesis round every `steps_per_round`
student steps (the references' kd_steps; 400 = one round per 400-step epoch) adds a batch to a bounded
in-memory pool, and every student step distils on a batch drawn from the pool, crop/flip-augmented as
the references' pool loader does. The student never sees a training image; the teacher stays frozen and
in eval mode while synthesis trains through it. Pool, synthesizer state and (Fast) the generator and its
meta optimizer are in the checkpoint, so a resumed run continues with the uninterrupted run's batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from kd_lightning.data.resumable import global_seed
from kd_lightning.data.steps import step_seed
from kd_lightning.errors import ConfigError
from kd_lightning.schemes.data_free import DataFree
from kd_lightning.synthesis import DeepInversionSynthesizer, FastMetaSynthesizer, SyntheticPool
from kd_lightning.synthesis.augment import crop_flip
from kd_lightning.synthesis.losses import require_batch_norm

CHECKPOINT_SYNTHESIS = "synthesis"
# Written into the stage directory at the end of training when `save_pool` is on (never otherwise).
POOL_FILE = "synthetic_pool.pt"
# Distinguishes the synthesizer's seed from the step noise the base derives from the same step record.
SYNTHESIS_SEED_SALT = 0x5EED_1A7E


class PoolDistillation(DataFree):
    """The pool loop shared by DeepInversion and Fast-Datafree; subclasses build `self.synthesizer` and
    say how one round runs (`synthesis_round`). Synthesis losses are logged as `generator_<part>`."""

    def __init__(self, *args: Any, pool_size: int = 50_000, steps_per_round: int = 400,
                 student_crop_padding: int | None = 4, save_pool: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        require_batch_norm(self.teacher.model, type(self).__name__)
        if int(steps_per_round) < 1:
            raise ConfigError(f"scheme.steps_per_round (student steps per synthesis round) must be >= 1, got "
                              f"{steps_per_round!r}.")
        if student_crop_padding is not None and int(student_crop_padding) < 0:
            raise ConfigError(f"scheme.student_crop_padding must be >= 0, or null for no augmentation of pool "
                              f"batches, got {student_crop_padding!r}.")
        self.pool = SyntheticPool(pool_size)
        self.steps_per_round = int(steps_per_round)
        self.student_crop_padding = None if student_crop_padding is None else int(student_crop_padding)
        self.save_pool = bool(save_pool)

    def synthesis_round(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must implement synthesis_round()")

    def data_free_step(self) -> dict[str, Tensor]:
        losses: dict[str, Tensor] = {}
        if self.global_step % self.steps_per_round == 0:
            # Seeded by the step, not carried: a resumed run's round draws what the uninterrupted one's did.
            self.synthesizer.rng.manual_seed(
                step_seed(global_seed(), self.current_epoch, self._record) ^ SYNTHESIS_SEED_SALT)
            images, labels, parts = self.synthesis_round()
            self.release_features()
            self.pool.to(self.device).add(images.float(), labels)
            self.remember(images)
            for name, value in parts.items():
                losses[f"generator_{name}"] = value
                self.nonfinite.record(f"generator_{name}", value, self.global_step)
        images, _ = self.pool.to(self.device).sample(self.batch_size, self._noise)
        if self.student_crop_padding is not None:
            images = crop_flip(images, self.student_crop_padding, self._noise)
        student = self.student_losses(images)
        self.optimise(student_loss=torch.stack([v.float() for v in student.values()]).sum())
        return {**student, **losses}

    def on_train_end(self) -> None:
        if self.save_pool and self.trainer.is_global_zero:
            self.pool.save(Path(self.trainer.default_root_dir) / POOL_FILE)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_SYNTHESIS] = {"pool": self.pool.state_dict(), "synthesizer": self.synthesizer.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        synthesis = checkpoint.get(CHECKPOINT_SYNTHESIS)
        if synthesis is None:
            raise ConfigError(f"This checkpoint has no synthetic pool: it was not written by {type(self).__name__}. "
                              "Resume with the scheme that wrote it, or start without ckpt_path.")
        self.pool.load_state_dict(synthesis["pool"])
        self.synthesizer.load_state_dict(synthesis["synthesizer"])


class DeepInversion(PoolDistillation):
    """DeepInversion (Yin et al., CVPR 2020): each round optimises `synthesis_batch_size` inputs for
    `iterations` Adam steps against the teacher (see `DeepInversionSynthesizer`); `adi_weight` > 0 adds
    Adaptive DeepInversion's competition with the current student. Given the data's normalisation
    (`normalize_mean`/`normalize_std`), inputs are clipped to the pixel range after each step."""

    generator_losses = tuple(f"generator_{name}" for name in ("ce", "bn", "tv_l1", "tv_l2", "l2", "adi"))

    def __init__(self, *args: Any, synthesis: Mapping[str, Any] | None = None,
                 normalize_mean: Sequence[float] | None = None, normalize_std: Sequence[float] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = dict(synthesis or {})
        try:
            self.synthesizer = DeepInversionSynthesizer(
                self.teacher.model, num_classes=self.num_classes, image_shape=self.input_shape,
                mean=normalize_mean, std=normalize_std, **options)
        except TypeError as error:
            raise ConfigError(f"scheme.synthesis={options} is not a DeepInversion setting ({error}). Its keys: "
                              "batch_size, iterations, lr, betas, ce_weight, bn_weight, first_bn_multiplier, tv_l1, "
                              "tv_l2, l2, adi_weight, adi_temperature, jitter, flip, random_labels, keep_best.") from None

    def synthesis_round(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        return self.synthesizer.synthesize(self.student)


class FastDatafree(PoolDistillation):
    """Fast-Datafree (Fang et al., AAAI 2022): each round fine-tunes a copy of the meta generator for
    `steps` steps (see `FastMetaSynthesizer`) and meta-updates the generator with the scheme's generator
    optimizer (Adam at lr_generator·steps, betas (0.5, 0.999) unless `generator_optimizer` says otherwise).
    The generator is the data-free base's (`scheme.generator`): its tanh + affine-free BN head emits
    teacher-space images directly, where the reference's Sigmoid head emits pixels it then normalises.
    The references' warm-up epochs synthesise without training the student: here the first round runs
    `warmup_rounds` extra rounds before the first student step. Only the student's rate is scheduled
    (`scheme.schedule`, datafree_kd.py's cosine to 2e-4); the meta Adam stays constant, as fast_meta.py's."""

    uses_generator = True
    generator_losses = tuple(f"generator_{name}" for name in ("bn", "ce", "adv"))

    def __init__(self, *args: Any, synthesis: Mapping[str, Any] | None = None,
                 generator_optimizer: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        options = dict(synthesis or {})
        steps, lr_generator = options.get("steps", 2), options.get("lr_generator", 5e-3)
        meta = generator_optimizer or {"_target_": "torch.optim.Adam", "lr": float(lr_generator) * int(steps),
                                       "betas": [0.5, 0.999]}
        super().__init__(*args, generator_optimizer=meta, **kwargs)
        assert self.generator is not None
        try:
            self.synthesizer = FastMetaSynthesizer(
                self.teacher.model, self.generator, num_classes=self.num_classes,
                latent_dim=self.generator.latent_dim, **options)
        except TypeError as error:
            raise ConfigError(f"scheme.synthesis={options} is not a Fast-Datafree setting ({error}). Its keys: "
                              "batch_size, steps, lr_generator, lr_latent, bn_weight, ce_weight, adv_weight, "
                              "bn_momentum, warmup_rounds, meta_update, reset_l0, crop_padding.") from None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.trainer.world_size > 1:
            raise ConfigError("scheme=fast_datafree runs on one device: its meta gradient is set on the generator, not "
                              "backpropagated, so DDP would not average it and the ranks' generators would drift "
                              "apart. Run with trainer.devices=1, or use scheme=deep_inversion (no generator) under DDP.")

    def synthesis_round(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        meta_optimizer = self.optimizers()[1].optimizer  # raw: the meta gradient is set, not backpropagated
        if self.synthesizer.rounds == 0:
            for _ in range(self.synthesizer.warmup_rounds):
                images, labels, _ = self.synthesizer.synthesize(self.student, meta_optimizer)
                self.pool.to(self.device).add(images.float(), labels)
        return self.synthesizer.synthesize(self.student, meta_optimizer)


__all__ = ["DeepInversion", "FastDatafree", "PoolDistillation"]
