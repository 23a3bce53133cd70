"""Generator-based data-free methods on the `DataFree` base, and the N(0,1) floor.

Each reads its recipe from the authors' code; the schemes' configs (conf/scheme/*.yaml) carry the MNIST
settings. Student losses are the `distill` terms; the generator's losses are the scheme's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.data.resumable import global_seed
from kd_lightning.data.steps import step_seed
from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.schemes.data_free import DataFree
from kd_lightning.synthesis.pool import SyntheticPool
from kd_lightning.taps import FeatureTaps


def class_prior_losses(teacher_logits: Tensor) -> dict[str, Tensor]:
    """DAFL's two unweighted losses on the teacher's logits alone (Chen et al., "Data-Free Learning of Student
    Networks", ICCV 2019; DAFL_train.py): one-hot CE of the teacher against its own argmax, and the information
    entropy Σ_k p̄_k log10 p̄_k of the batch-mean softmax (minimised: balanced classes; log10 as the code, whose
    weights were tuned with it)."""
    logits = teacher_logits.float()
    mean_probability = logits.softmax(1).mean(0)
    return {"one_hot": F.cross_entropy(logits, logits.argmax(1)),
            "information_entropy": (mean_probability * torch.log10(mean_probability)).sum()}


def class_prior_weights(priors: dict[str, Any]) -> dict[str, float]:
    """The positive `scheme.class_priors` weights by name; anything but non-negative numbers for the two priors
    is refused with the fix."""
    problem = ConfigError(f"scheme.class_priors takes non-negative weights for one_hot and information_entropy "
                          f"(0 = off), got {priors!r}.")
    if set(priors) - {"one_hot", "information_entropy"}:
        raise problem
    try:
        weights = {name: float(weight) for name, weight in priors.items()}
    except (TypeError, ValueError):
        raise problem from None
    if any(not weight >= 0 for weight in weights.values()):  # `not >=` also refuses NaN
        raise problem
    return {name: weight for name, weight in weights.items() if weight > 0}


CHECKPOINT_REPLAY = "replay_pool"


@dataclass(frozen=True)
class ReplaySettings:
    """`scheme.replay` of DFAD/ZSKT: pool capacity (images; 0 = off); every `push_every_n_steps` student steps
    `push_images` of the step's batch join the pool; `batch_size` pool images join every student batch.
    `push_images` and `batch_size` null: an eighth of the fresh batch, as MB-DFKD's memory slices."""

    capacity: int
    push_every_n_steps: int
    push_images: int
    batch_size: int

    @classmethod
    def from_config(cls, options: dict[str, Any], fresh_batch: int) -> "ReplaySettings":
        eighth = max(1, fresh_batch // 8)
        defaults = {"capacity": 0, "push_every_n_steps": 10, "push_images": eighth, "batch_size": eighth}
        chosen = {**defaults, **{name: value for name, value in options.items() if value is not None}}
        minimum = {"capacity": 0, "push_every_n_steps": 1, "push_images": 1, "batch_size": 1}
        if set(options) - set(defaults) or any(
                isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value
                or value < minimum[name] for name, value in chosen.items()):
            raise ConfigError(
                f"scheme.replay={options!r} is not a replay config: it takes capacity (images, >= 0; 0 = off), "
                f"push_every_n_steps, push_images and batch_size (whole numbers >= 1; push_images and batch_size "
                f"null = scheme.batch_size / 8), e.g. scheme.replay.capacity=8192.")
        return cls(**{name: int(value) for name, value in chosen.items()})


def dafl_generator_losses(teacher_logits: Tensor, teacher_features: Tensor) -> dict[str, Tensor]:
    """DAFL's three unweighted generator losses: the class priors and −mean|f_T| of the teacher's features
    (activation)."""
    return {**class_prior_losses(teacher_logits), "activation": -teacher_features.float().abs().mean()}


def zskt_divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(T‖S) at `temperature` averaged over batch and classes, as ZSKT's `F.kl_div` default reduction
    (no T² factor): the catalogue's batch-mean `kd` divided by T²·K."""
    return functional.kd(student_logits, teacher_logits, temperature) / (temperature ** 2 * student_logits.shape[1])


def out_feature_tap(model: Any) -> str:
    """The teacher feature DAFL's activation loss reads, as its reference models return it with
    `out_feature=True`: LeNet-5's 120-d relu3 output (`stage3`, the model's `out_feature_tap`), and for
    every other family the pooled feature the classifier reads (`penultimate`, DAFL's ResNet `out.view`
    after the average pool)."""
    return getattr(model, "out_feature_tap", "penultimate")


class DAFL(DataFree):
    """DAFL: the generator minimises oh·one-hot + ie·entropy + a·activation through the frozen teacher; the
    student distils (the `distill` terms, KL at T=1 in the reference) on the same batch, detached. One joint
    backward and both optimizers stepped, as the reference's single `loss.backward()`.

    `activation_tap` null (the default) reads the feature the reference's teacher returns (`out_feature_tap`:
    `stage3` for LeNet-5, `penultimate` for ResNets and the rest). With `scheduled` the run's schedule
    reaches the student only: the reference's CIFAR recipe steps the student's rate down (×0.1 at epochs 800
    and 1600) and keeps the generator's Adam constant."""

    uses_generator = True
    generator_losses = ("generator_one_hot", "generator_information_entropy", "generator_activation")

    def __init__(self, *args: Any, one_hot: float = 1.0, information_entropy: float = 5.0, activation: float = 0.1,
                 activation_tap: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.weights = {"one_hot": float(one_hot), "information_entropy": float(information_entropy),
                        "activation": float(activation)}
        if activation_tap is None:
            activation_tap = out_feature_tap(self.teacher.model)
        self.activation_tap = activation_tap
        self.activation_taps = FeatureTaps(self.teacher.model, [activation_tap],
                                           getattr(self.teacher.model, "kd_spec", {}).get("name", "teacher"))

    def data_free_step(self) -> dict[str, Tensor]:
        assert self.generator is not None
        images = self.generator(self.latent())
        self.remember(images)
        teacher_logits = self.teacher_with_grad(images)
        parts = dafl_generator_losses(teacher_logits, self.activation_taps.features[self.activation_tap])
        self.activation_taps.clear()
        generator = {f"generator_{name}": self.weights[name] * value for name, value in parts.items()}
        for name, value in generator.items():
            self.nonfinite.record(name, value, self.global_step)
        student = self.student_losses(images, teacher_logits)
        self.optimise(student_loss=torch.stack([v.float() for v in student.values()]).sum(),
                      generator_loss=torch.stack([v.float() for v in generator.values()]).sum())
        return {**student, **generator}


def check_unused_parameter_detection(strategy: Any, world_size: int, scheme: str) -> None:
    """Separate generator and student steps leave one network without gradients in each backward, which
    DDP accepts only with unused-parameter detection on."""
    ddp_options = getattr(strategy, "_ddp_kwargs", None)
    if world_size > 1 and ddp_options is not None and not ddp_options.get("find_unused_parameters"):
        raise ConfigError(f"scheme={scheme.lower()} steps its generator and its student in separate backward passes, "
                          f"each of which leaves the other network without gradients; DDP allows that only with "
                          f"unused-parameter detection. Run with trainer.strategy=ddp_find_unused_parameters_true "
                          f"(DAFL's single joint backward runs with plain ddp).")


class Adversarial(DataFree):
    """The adversarial loop of DFAD and ZSKT: the student minimises its terms on generated batches, the
    generator maximises `disagreement` (through both networks) once every `student_steps` student steps —
    after them (DFAD's 5 S then 1 G) or before them (ZSKT's 1 G then 10 S). With `repeat_batch` one latent
    serves a whole round (ZSKT's `n_repeat_batch`: the generator step and the round's student steps all see
    G(z) of the same z); without it every step draws its own (DFAD).

    `class_priors` adds DAFL's one-hot and information-entropy losses (weights; 0 = off, the references) to
    the generator's loss: the adversarial term alone may lead the generator to inputs far from the teacher's
    classes, on which the student learns little that transfers (DFQ and CMI add the same two priors).

    `replay` (capacity 0 = off, the references) keeps a bounded pool of earlier generated images and appends
    `batch_size` of them to every student batch: the generator's distribution moves, and a student that only
    sees its latest output forgets what it learnt on the earlier ones (MB-DFKD, Binici et al., WACV 2022, whose
    memory holds batch/8-image slices of past batches). Every `push_every_n_steps` student steps the first
    `push_images` images of the step's batch join the pool; it is in the checkpoint."""

    uses_generator = True
    generator_losses = ("generator_adversarial", "generator_one_hot", "generator_information_entropy")
    generator_first = False

    def __init__(self, *args: Any, student_steps: int = 5, repeat_batch: bool = False,
                 class_priors: Mapping[str, float] | None = None, replay: Mapping[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if int(student_steps) < 1:
            raise ConfigError(f"scheme.student_steps (student steps per generator step) must be >= 1, got "
                              f"{student_steps!r}.")
        self.class_priors = class_prior_weights(dict(class_priors or {}))
        self.replay = ReplaySettings.from_config(dict(replay or {}), self.batch_size)
        self.replay_pool = SyntheticPool(self.replay.capacity) if self.replay.capacity else None
        self.student_steps = int(student_steps)
        self.repeat_batch = bool(repeat_batch)
        self._round_latent: tuple[int, Tensor] | None = None

    def latent(self) -> Tensor:
        if not self.repeat_batch:
            return super().latent()
        assert self.generator is not None
        round_index = self.global_step // self.student_steps
        if self._round_latent is None or self._round_latent[0] != round_index:
            # Seeded by (run seed, round, rank) rather than kept from the round's first step, so a run resumed
            # mid-round draws the uninterrupted run's latent without it being in the checkpoint. These seeds can
            # equal step seeds of other (epoch, record) pairs, but a repeating scheme draws no per-step noise.
            seed = torch.Generator(device=self.device).manual_seed(
                step_seed(global_seed(), round_index, self.global_rank))
            self._round_latent = (round_index, torch.randn(self.batch_size, self.generator.latent_dim,
                                                           generator=seed, device=self.device))
        return self._round_latent[1]

    def disagreement(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement disagreement()")

    def setup(self, stage: str) -> None:
        check_unused_parameter_detection(self.trainer.strategy, self.trainer.world_size, type(self).__name__)

    def generator_step(self) -> dict[str, Tensor]:
        assert self.generator is not None
        # Toggled before the forward, so the student's parameters record no graph and get no gradient.
        with self.toggled_optimizer(self.student_and_generator_optimizers()[1]):
            images = self.generator(self.latent())
            teacher_logits = self.teacher_with_grad(images)
            adversarial = -self.disagreement(self.student(images), teacher_logits)
            self.nonfinite.record("generator_adversarial", adversarial, self.global_step)
            losses = {"generator_adversarial": adversarial}
            if self.class_priors:
                priors = class_prior_losses(teacher_logits)
                for name, weight in self.class_priors.items():
                    losses[f"generator_{name}"] = weight * priors[name]
                    self.nonfinite.record(f"generator_{name}", losses[f"generator_{name}"], self.global_step)
            self.release_features()
            self.optimise(generator_loss=torch.stack(list(losses.values())).sum())
        return {name: value.detach() for name, value in losses.items()}

    def data_free_step(self) -> dict[str, Tensor]:
        assert self.generator is not None
        position = self.global_step % self.student_steps  # student steps done in this round
        losses: dict[str, Tensor] = {}
        if self.generator_first and position == 0:
            losses.update(self.generator_step())
        with torch.no_grad():
            images = self.generator(self.latent())
        self.remember(images)
        student = self.student_losses(self.with_replay(images))
        self.optimise(student_loss=torch.stack([v.float() for v in student.values()]).sum())
        losses.update(student)
        if not self.generator_first and position == self.student_steps - 1:
            losses.update(self.generator_step())
        return losses

    def with_replay(self, images: Tensor) -> Tensor:
        """`images` followed by a replay batch from the pool (drawn before this batch joins it, so a batch is
        never replayed in its own step); `images` alone while replay is off or the pool is empty."""
        if self.replay_pool is None:
            return images
        pool = self.replay_pool.to(self.device)
        batch = images
        if len(pool):
            batch = torch.cat([images, pool.sample(self.replay.batch_size, self._noise)[0].to(images)])
        if self.global_step % self.replay.push_every_n_steps == 0:
            pool.add(images[: self.replay.push_images].float())
        return batch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.replay_pool is not None:
            checkpoint[CHECKPOINT_REPLAY] = self.replay_pool.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.replay_pool is None:
            return
        if CHECKPOINT_REPLAY not in checkpoint:
            raise ConfigError("This checkpoint has no replay pool: it was written with scheme.replay.capacity=0. "
                              "Resume with the replay settings it was trained with, or start without ckpt_path.")
        self.replay_pool.load_state_dict(checkpoint[CHECKPOINT_REPLAY])


class DFAD(Adversarial):
    """DFAD (Fang et al., "Data-Free Adversarial Distillation", 2019; DFAD_mnist.py): 5 student steps on
    G(z).detach() minimising L1(s, t) (the `l1_logits` term), then one generator step maximising the same L1.
    With `scheduled` both rates follow the schedule, as the reference's `--scheduler` steps both (StepLR on
    MNIST, MultiStepLR [100, 200] on CIFAR). DFAD_cifar.py/DFAD_mnist.py step their schedulers at the *start*
    of each epoch (`for epoch in range(1, epochs + 1): scheduler_S.step(); ...; train(...)`), so each ×0.1
    lands one epoch earlier than under Lightning's end-of-epoch stepping: its 1-based epoch 100 already
    trains at 0.1× the rate. Milestones one less ([99, 199]; step_size − 1 for MNIST) reproduce it."""

    scheduled_players = ("student", "generator")

    def disagreement(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return functional.l1_logits(student_logits, teacher_logits)


class ZSKT(Adversarial):
    """ZSKT (Micaelli & Storkey, "Zero-Shot Knowledge Transfer via Adversarial Belief Matching", NeurIPS
    2019; solver.py): one generator step maximising KL(T‖S), then 10 student steps minimising KL + β·AT
    (`distill=[kd, at]`). One pseudo batch per round (`repeat_batch`, the reference's `LearnableLoader` keeps
    z for n_repeat_batch = 1 + 10 calls), drawn after the generator step.

    The reference's divergence is `F.kl_div` at `KL_temperature` with its default reduction, the mean over
    batch *and* classes and no T² factor: the catalogue's batch-mean T²·KL divided by T²·K. Both players use
    it, so the `kd` term is rescaled here by 1/(T²·K), K the data's class count (0.1 at T=1 for 10 classes,
    0.01 for 100): `distill.kd.weight` multiplies the reference's divergence, and the loss summary shows
    the rescaled weight. `temperature` is the reference's one KL_temperature (conf/scheme/zskt.yaml passes
    it to the `kd` term too; a `kd` term at another temperature is a ConfigError). With `scheduled` both rates follow the schedule, as the reference anneals both
    Adams (CosineAnnealingLR over the run)."""

    generator_first = True
    scheduled_players = ("student", "generator")

    def __init__(self, *args: Any, student_steps: int = 10, temperature: float = 1.0, repeat_batch: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(*args, student_steps=student_steps, repeat_batch=repeat_batch, **kwargs)
        self.temperature = float(temperature)
        if not self.temperature > 0:
            raise ConfigError(f"scheme.temperature={temperature!r} must be > 0: ZSKT's KL_temperature divides the "
                              f"logits of both players (the reference's scripts use 1).")
        kd = self.terms["kd"] if "kd" in self.terms else None
        if kd is not None and float(kd.temperature) != self.temperature:
            # Two temperatures would have the student minimise a different divergence than the generator
            # maximises; solver.py has one KL_temperature for both players.
            raise ConfigError(f"ZSKT's kd term has temperature {kd.temperature} but scheme.temperature is "
                              f"{self.temperature}: the reference uses one KL_temperature for the student and the "
                              f"generator. Set scheme.temperature=<T> (it reaches the kd term through "
                              f"recipe.kd_temperature) and drop the distill.kd.temperature override.")
        if kd is not None:
            kd.weight = kd.weight / (kd.temperature ** 2 * self.num_classes)

    def disagreement(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return zskt_divergence(student_logits, teacher_logits, self.temperature)


class NoiseInputs(DataFree):
    """The N(0,1) floor of DAFL's Table 1: the student distils on Gaussian noise of the input's shape,
    no generator (DAFL reports 88.01% for LeNet-5-half on MNIST)."""

    def data_free_step(self) -> dict[str, Tensor]:
        images = self.noise(self.batch_size, *self.input_shape)
        self.remember(images)
        student = self.student_losses(images)
        self.optimise(student_loss=torch.stack([v.float() for v in student.values()]).sum())
        return student


__all__ = ["DAFL", "DFAD", "NoiseInputs", "ReplaySettings", "ZSKT", "class_prior_losses", "dafl_generator_losses",
           "zskt_divergence"]
