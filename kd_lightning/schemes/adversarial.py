"""Adversarial distillation: a discriminator learns to tell the teacher's outputs from the student's, and the
student learns to fool it, in a real alternation of two optimizers under Lightning's manual optimisation."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kd_lightning.data.inputs import batch_size_of
from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms.base import DistillTerm
from kd_lightning.schemes.base import unpack_batch
from kd_lightning.schemes.manual import step_schedulers, uncounted_step
from kd_lightning.schemes.offline import Offline
from kd_lightning.schemes.watch import NonFiniteWatch
from kd_lightning.taps import FeatureTaps

LOGITS = "logits"
STRATEGIES_WITHOUT_UNUSED = ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def discriminator_loss(teacher_scores: Tensor, student_scores: Tensor) -> Tensor:
    """½·[BCE(D(teacher), 1) + BCE(D(student), 0)], each averaged over the batch: MEAL's BCE over the
    concatenated student and teacher batch, with one "teacher" logit instead of two complementary ones."""
    teacher_scores, student_scores = teacher_scores.float(), student_scores.float()
    return 0.5 * (F.binary_cross_entropy_with_logits(teacher_scores, torch.ones_like(teacher_scores))
                  + F.binary_cross_entropy_with_logits(student_scores, torch.zeros_like(student_scores)))


def fooling_loss(student_scores: Tensor) -> Tensor:
    """−log σ(D(student)), the batch mean: the non-saturating generator loss (the student is rewarded for
    being taken for the teacher), whose gradient does not vanish while the discriminator is winning."""
    student_scores = student_scores.float()
    return F.binary_cross_entropy_with_logits(student_scores, torch.ones_like(student_scores))


class Discriminator(nn.Module):
    """MEAL's discriminator on one output: widths d → d/K → d/K² with ReLU, then one teacher-vs-student logit.

    MEAL's three 1×1 convolutions on an N×d×1×1 view are these linear layers; its last layer has two outputs
    behind a ReLU, which clamps the logits at 0 (a probability of at least ½); here the last layer is linear.
    A feature map is global-average pooled first (MEAL pools its intermediate outputs too).
    """

    def __init__(self, in_features: int, reduction: int = 2) -> None:
        super().__init__()
        widths = [in_features, max(1, in_features // reduction), max(1, in_features // reduction ** 2)]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths, widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        self.layers = nn.Sequential(*layers, nn.Linear(widths[-1], 1))

    def forward(self, output: Tensor) -> Tensor:
        return self.layers(flat(output)).squeeze(1)


def flat(output: Tensor) -> Tensor:
    return (F.adaptive_avg_pool2d(output, 1) if output.dim() == 4 else output).flatten(1)


class Adversarial(Offline):
    """Adversarial KD: `Offline` (frozen teacher, any catalogue terms, CE) plus a discriminator per discriminated
    output and the term `adversarial_weight·fooling_loss`, trained in alternation.

    Each batch: one forward of both networks; `discriminator_steps` steps of the discriminators' own optimizer
    on `discriminator_loss` (student outputs detached, student parameters toggled off); then one student step
    on CE + terms + adversarial term with the discriminators toggled off (no gradient reaches them). Outputs
    are `logits` and, optionally, tap names whose student and teacher widths agree (`discriminate`).

    Follows MEAL (AaronHeee/MEAL, Shen et al. AAAI 2019) and MEAL-V2 (szq0214/MEAL-V2): discriminator on the
    raw logits, three layers narrowing by K (MEAL's default 2 on CIFAR, MEAL-V2's 8 on ImageNet), BCE with
    teacher and student labelled apart, adversarial weight 1. Differs: both reference codes put the student
    and the discriminator in one SGD optimizer and back-propagate CE-to-teacher + D loss once. By default
    both players therefore *minimise* the D loss (schemes-notes.md §3); MEAL's `--grl` (main.py, off by
    default; models/discriminator.py `GradReverse`) puts a gradient-reversal layer in front of the
    discriminators, so the student ascends the D loss the discriminators descend — a min-max, in one step.
    MEAL-V2 has no such switch. Here the min-max is an alternation: the discriminator has its own optimizer
    (`discriminator_optimizer`, a Hydra partial) and the student minimises the non-saturating −log D(student)
    rather than the reversed D loss. The references also schedule the discriminator with the student (MEAL:
    its `d_lr` 0.1 param group under the same MultiStepLR; MEAL-V2: the LR regime sets every group, `d_lr`
    1e-4 included, to the student's rate); here it keeps a constant rate, the GAN convention of Lightning's
    template, since its own Adam is not the student's SGD. The student's loss is the chosen `distill` terms
    with their own recipes (KD's CE 0.1 + 0.9·KD at T=4 by default), so the scheme is compared with the same
    terms without a discriminator; MEAL and MEAL-V2 train on the soft cross-entropy to the teacher's softmax
    at T=1 and no hard labels: `distill.kd.temperature=1 distill.kd.weight=1 scheme.ce_weight=0`.

    `global_step` counts student steps and the student's scheduler is stepped by hand where automatic
    optimisation would step it, by the mechanism the data-free schemes share (`schemes.manual`). Trainer gradient clipping and accumulation
    are refused (Lightning does not apply them under manual optimisation). Terms with an init stage get it
    first, as under `Offline` (one optimizer, the discriminators frozen).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, terms: Mapping[str, DistillTerm], num_classes: int,
                 example_input: Tensor, discriminator_optimizer: Any = None, adversarial_weight: float = 1.0,
                 discriminator_steps: int = 1, discriminate: Sequence[str] = (LOGITS,), reduction: int = 2,
                 **offline: Any) -> None:
        discriminator_optimizer = optimizer_factory(discriminator_optimizer)
        if int(discriminator_steps) != discriminator_steps or discriminator_steps < 1:
            raise ConfigError(f"scheme.discriminator_steps={discriminator_steps} must be a whole number ≥ 1: the "
                              f"discriminator's optimizer steps per student step (GAN practice: 1 to 5).")
        if adversarial_weight < 0 or reduction < 1:
            raise ConfigError(f"scheme.adversarial_weight={adversarial_weight} must be ≥ 0 and scheme.reduction="
                              f"{reduction} ≥ 1 (MEAL: weight 1, reduction 2 on CIFAR, 8 on ImageNet).")
        discriminate = [discriminate] if isinstance(discriminate, str) else list(discriminate)
        if not discriminate or len(set(discriminate)) != len(discriminate):
            raise ConfigError(f"scheme.discriminate={discriminate} must list distinct outputs to discriminate: "
                              f"'logits' and/or tap names, e.g. scheme.discriminate=[logits,penultimate].")
        super().__init__(student, teacher, terms, num_classes, example_input, **offline)
        self.automatic_optimization = False
        self.discriminator_optimizer_factory = discriminator_optimizer
        self.adversarial_weight = float(adversarial_weight)
        self.discriminator_steps = int(discriminator_steps)
        self.discriminated = discriminate
        taps = [name for name in discriminate if name != LOGITS]
        self.adversary_taps = {role: FeatureTaps(network, taps, getattr(network, "kd_spec", {}).get("name", role))
                               for role, network in (("student", student), ("teacher", self.teacher.model))}
        self._outputs: dict[str, dict[str, Tensor]] = {"student": {}, "teacher": {}}
        for role, network in (("student", student), ("teacher", self.teacher.model)):
            network.register_forward_hook(self._keep_logits(role))
        self._check_cached_outputs()
        widths = self._output_widths(example_input)
        self.discriminators = nn.ModuleDict({key(name): Discriminator(widths[name], int(reduction))
                                             for name in discriminate})
        # Trained in the main stage only: an init stage (FT's paraphraser) freezes them like the student.
        self._trainable |= {id(p) for p in self.discriminators.parameters()}
        self.nonfinite = NonFiniteWatch(
            [*self.nonfinite.names, "adversarial", "discriminator"],
            remedies={"adversarial": "scheme.adversarial_weight or the learning rate (optimizer.lr)",
                      "discriminator": "the discriminator's learning rate (scheme.discriminator_optimizer.lr)"})

    def _check_cached_outputs(self) -> None:
        """With the teacher cache the teacher runs only on a batch's missed samples, so its hooks see a subset
        (or nothing); the discriminator takes the teacher's side from the cache's merged outputs instead,
        which hold the logits and the terms' vector taps only."""
        if self.teacher_outputs is None:
            return
        uncached = [name for name in self.discriminated if name != LOGITS and name not in self.teacher_outputs.slices]
        if uncached:
            raise ConfigError(
                f"scheme.discriminate lists {uncached}, which the teacher cache does not store: it keeps the teacher's "
                f"logits and the vector taps the distill terms read, and the teacher runs only on the samples it "
                f"misses, so the discriminator would see the teacher's outputs for part of the batch. Discriminate "
                f"the logits (scheme.discriminate=[logits]), or run without the cache (teacher_cache=none).")

    def teacher_logits_and_features(self, images: Tensor) -> tuple[Tensor, Mapping[str, Tensor]]:
        logits, features = super().teacher_logits_and_features(images)
        if self.teacher_outputs is not None:  # whole-batch outputs, hits and misses merged
            self._outputs["teacher"][LOGITS] = logits
            for name in self.discriminated:
                if name != LOGITS:
                    self._outputs["teacher"][name] = features[name]
        return logits, features

    def on_train_start(self) -> None:
        super().on_train_start()
        # A precomputed cache ran the teacher over the training set: drop what its hooks kept of the last batch.
        self.release_features()

    def _keep_logits(self, role: str) -> Callable:
        def keep(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self._outputs[role][LOGITS] = output
        return keep

    def _output_widths(self, example_input: Tensor) -> dict[str, int]:
        self.example_forward(example_input)
        outputs = {role: self.discriminated_outputs(role) for role in self._outputs}
        self.release_features()
        widths = {}
        for name in self.discriminated:
            student_width, teacher_width = (flat(outputs[role][name]).shape[1] for role in ("student", "teacher"))
            if student_width != teacher_width:
                raise ConfigError(
                    f"scheme.discriminate lists {name!r}, whose student output has {student_width} values per sample "
                    f"after pooling and the teacher's {teacher_width}; one discriminator cannot compare them. Choose "
                    f"taps of equal channel counts (e.g. penultimate of equal-width networks), or discriminate "
                    f"logits only: scheme.discriminate=[logits].")
            widths[name] = int(student_width)
        return widths

    def discriminated_outputs(self, role: str) -> dict[str, Tensor]:
        """The latest forward's discriminated outputs of `role` ("student" or "teacher"), by name."""
        # `_outputs` last: under the teacher cache it holds the whole batch, the hooks only the missed samples.
        captured = {**self.adversary_taps[role].features, **self._outputs[role]}
        return {name: captured[name] for name in self.discriminated}

    def release_features(self) -> None:
        super().release_features()
        for role in self._outputs:
            self._outputs[role].clear()
            self.adversary_taps[role].clear()

    def discriminator_scores(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: self.discriminators[key(name)](outputs[name]) for name in self.discriminated}

    def configure_optimizers(self) -> Any:
        if self.init_stage:  # one optimizer, over the init stage's parameters (Offline's)
            return super().configure_optimizers()
        student = super().configure_optimizers()
        discriminator = self.discriminator_optimizer_factory(self.discriminators.parameters())
        return [student if isinstance(student, dict) else {"optimizer": student}, {"optimizer": discriminator}]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student optimizer's parameters: every trainable one but the discriminators'."""
        own = {id(p) for p in self.discriminators.parameters()}
        return [p for p in super().trainable_parameters() if id(p) not in own]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, targets, indices = unpack_batch(batch)
        losses = self.training_losses(images, targets, indices)
        if self.init_stage:  # the terms' initialisation: no discriminator yet, a constant rate, no schedule
            return self._step(self.optimizers(), self.log_training_losses(losses, batch_size_of(images)))
        student_optimizer, discriminator_optimizer = self.optimizers()
        teacher, student = self.discriminated_outputs("teacher"), self.discriminated_outputs("student")
        with self.toggled_optimizer(discriminator_optimizer):
            self._train_discriminators(discriminator_optimizer, teacher, student, batch_size_of(images))
        with self.toggled_optimizer(student_optimizer):
            scores = self.discriminator_scores(student)
            adversarial = torch.stack([fooling_loss(value) for value in scores.values()]).sum()
            self.nonfinite.record("adversarial", adversarial, self.global_step)
            losses["adversarial"] = self.adversarial_weight * adversarial
            total = self._step(student_optimizer, self.log_training_losses(losses, batch_size_of(images)))
        step_schedulers(self)
        return total

    def _train_discriminators(self, optimizer: Any, teacher: Mapping[str, Tensor], student: Mapping[str, Tensor],
                              batch_size: int) -> None:
        student = {name: value.detach() for name, value in student.items()}
        for _ in range(self.discriminator_steps):
            real, fake = self.discriminator_scores(teacher), self.discriminator_scores(student)
            loss = torch.stack([discriminator_loss(real[name], fake[name]) for name in real]).sum()
            self.nonfinite.record("discriminator", loss, self.global_step)
            optimizer.zero_grad()
            self.manual_backward(loss)
            uncounted_step(self, optimizer)
        self.log("train/discriminator", loss.detach(), batch_size=batch_size)

    def _step(self, optimizer: Any, loss: Tensor) -> Tensor:
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss

    def loss_summary(self) -> str:
        if self.init_stage:
            return super().loss_summary()
        steps = self.discriminator_steps
        steps = f", {steps} discriminator steps per student step" if steps > 1 else ""
        return (f"{super().loss_summary()} + {self.adversarial_weight}·adversarial"
                f"({'+'.join(self.discriminated)}{steps})")


def key(output: str) -> str:
    return output.replace(".", "_").replace(":", "_")


def optimizer_factory(config: Any) -> Callable:
    """The discriminator's optimizer factory from its config (a Hydra partial) or a callable."""
    if config is None:
        raise ConfigError(
            "scheme=adversarial trains a discriminator, which needs its own optimizer, but "
            "scheme.discriminator_optimizer is not set. Give it as a Hydra partial, e.g. "
            "'scheme.discriminator_optimizer={_target_:torch.optim.Adam,_partial_:true,lr:1e-4,betas:[0.5,0.999]}' "
            "(conf/scheme/adversarial.yaml sets this default).")
    if callable(config):
        return config
    if isinstance(config, (Mapping, DictConfig)) and "_target_" in config:
        node = OmegaConf.create(dict(config) if isinstance(config, Mapping) else config)
        node["_partial_"] = True
        return instantiate(node)
    raise ConfigError(f"scheme.discriminator_optimizer={config!r} is not an optimizer config; give a mapping with a "
                      f"_target_, e.g. {{_target_:torch.optim.Adam,lr:1e-4}}.")


def adversarial_plan(cfg: DictConfig) -> list:
    """`offline_plan`, refusing before anything trains the trainer settings manual optimisation ignores, and
    letting DDP find the parameters a step leaves without gradients (the student's in a discriminator step,
    the discriminators' in a student step) for the adversarial stage."""
    from kd_lightning.stages import offline_plan

    trainer = cfg.trainer
    if trainer.get("gradient_clip_val"):
        raise ConfigError(f"trainer.gradient_clip_val={trainer.gradient_clip_val}: Lightning does not clip gradients "
                          f"under manual optimisation, which scheme=adversarial uses to alternate its two "
                          f"optimizers. Remove the setting (trainer.gradient_clip_val=null).")
    if (trainer.get("accumulate_grad_batches") or 1) != 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}: Lightning does not "
                          f"accumulate gradients under manual optimisation, which scheme=adversarial uses. Use a "
                          f"larger data.batch_size instead, and remove the setting.")
    stages = offline_plan(cfg)
    stages[-1].label = stages[-1].label.replace("student + ", "student + adversarial + ", 1)
    strategy = str(trainer.get("strategy", "auto"))
    if strategy in STRATEGIES_WITHOUT_UNUSED:
        stages[-1].overrides = {**stages[-1].overrides, "trainer.strategy": f"{strategy}_find_unused_parameters_true"}
    return stages
