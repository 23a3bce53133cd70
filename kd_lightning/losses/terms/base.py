"""The contract every distillation term follows (see DESIGN.md: terms = what knowledge moves)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Sequence

import torch
from torch import Tensor, nn

from kd_lightning.data.mixing import hard_labels
from kd_lightning.errors import ConfigError

# Tap-list aliases, expanded per model by `DistillTerm.expand_taps`.
STAGES = "stages"  # every declared stage, shallow to deep
STAGES_PRE = "stages_pre"  # every declared stage's pre-ReLU tap (`stageK_pre`), shallow to deep
LAST_STAGE = "last_stage"  # the deepest declared stage


@dataclass
class DistillInputs:
    """What a scheme hands each term for one batch; a term reads only what it declared it needs.

    `targets` are class indices: a mixed batch's soft targets (mixup/CutMix) arrive as each sample's dominant
    class, the one DKD's target mask and OFA's target enhancement then read."""

    student_logits: Tensor
    targets: Tensor
    indices: Tensor
    teacher_logits: Tensor | None = None
    student_features: Mapping[str, Tensor] = field(default_factory=dict)
    teacher_features: Mapping[str, Tensor] = field(default_factory=dict)
    epoch: int = 0

    def __post_init__(self) -> None:
        if self.targets is not None:
            self.targets = hard_labels(self.targets)


@dataclass
class BuildContext:
    """What a term may size itself from, once, before training: tap shapes (batch dim included),
    the two networks (e.g. OFD reads the teacher's BN statistics), and facts about the data."""

    student_shapes: Mapping[str, torch.Size]
    teacher_shapes: Mapping[str, torch.Size]
    student: nn.Module | None = None
    teacher: nn.Module | None = None
    num_classes: int = 0
    train_size: int | None = None
    max_epochs: int | None = None
    train_targets: Tensor | None = None  # labels of the training split, by sample index


class DistillTerm(nn.Module):
    """A weighted loss between teacher and student outputs, owning any learnable adapters.

    Subclasses set `student_taps`/`teacher_taps` (tap names, or the alias "stages"), may create
    parameters in `build` once the tap shapes are known, and return from `loss` either one unweighted
    scalar or a dict of named unweighted scalars (each logged as `train/<term>_<part>`). The scheme
    multiplies by `weight` and by the linear warm-up factor min(1, (epoch + 1) / warmup_epochs).

    A term with a separate initialisation stage (FT's paraphraser, AB's connector pre-training) sets
    `init_epochs > 0` and implements `init_loss` and `init_parameters`; the pipeline then runs that
    stage before the main training, at the term's constant `init_lr` (None: the optimizer's learning rate).
    A term whose main-stage loss is zero by design (AB, FSP) sets `main_stage_loss = False`.

    `recipe_ce_weight` is the cross-entropy weight the term's published recipe trains with; the scheme
    uses it when `scheme.ce_weight` is null (see `schemes.composition`), and a config's `ce_weight` key
    sets it per run.
    """

    needs_teacher: ClassVar[bool] = True
    needs_indices: ClassVar[bool] = False
    # Whether the loss reads each sample's label (DKD's target mask): refused when labels are hidden.
    reads_targets: ClassVar[bool] = False
    main_stage_loss: ClassVar[bool] = True
    recipe_ce_weight: float = 1.0

    def __init__(self, weight: float = 1.0, warmup_epochs: int = 0, init_epochs: int = 0,
                 init_lr: float | None = None) -> None:
        super().__init__()
        if warmup_epochs < 0 or init_epochs < 0:
            raise ConfigError(f"warmup_epochs and init_epochs must be >= 0, got {warmup_epochs} and {init_epochs}.")
        if init_lr is not None and not init_lr > 0:
            raise ConfigError(f"init_lr is the initialisation stage's learning rate and must be > 0 (or null for "
                              f"the optimizer's), got {init_lr}.")
        self.weight = float(weight)
        self.warmup_epochs = int(warmup_epochs)
        self.init_epochs = int(init_epochs)
        self.init_lr = None if init_lr is None else float(init_lr)
        self.student_taps: list[str] = []
        self.teacher_taps: list[str] = []

    def weight_at(self, epoch: int) -> float:
        if self.warmup_epochs == 0:
            return self.weight
        return self.weight * min(1.0, (epoch + 1) / self.warmup_epochs)

    def expand_taps(self, student_stages: Sequence[str], teacher_stages: Sequence[str]) -> None:
        """Replace the stage aliases by the models' declared stages; called once by the scheme."""
        self.student_taps = _expand(self.student_taps, student_stages, "student")
        self.teacher_taps = _expand(self.teacher_taps, teacher_stages, "teacher")

    def resolve_model_taps(self, student: nn.Module, teacher: nn.Module) -> None:
        """Set taps that depend on the networks' structure (a transformer's blocks by index) and switch a
        network to the code path those taps read. Called once per (student, teacher) by the scheme after
        `expand_taps`, before any hook is registered or example forward runs, so shapes reach `build`."""

    def build(self, context: BuildContext) -> None:
        """Create shape-dependent parts (regressors, embeddings, memory banks)."""

    def check(self, name: str, context: BuildContext) -> None:
        """Refuse settings that cannot work for this run; called by the scheme after `build`."""
        if context.max_epochs is not None and self.warmup_epochs > context.max_epochs:
            raise ConfigError(
                f"distill.{name}.warmup_epochs={self.warmup_epochs} is longer than training "
                f"(trainer.max_epochs={context.max_epochs}), so the term would never reach its weight. Lower "
                f"warmup_epochs or train longer."
            )

    def check_batch(self, name: str, indices: Tensor | None) -> None:
        """Refuse a training batch this term cannot use. Called by the scheme while the batch is still in
        host memory, so a check here never waits for the device (one in `loss` would, every step)."""
        if self.needs_indices and indices is None:
            raise ConfigError(f"Term {name!r} needs sample indices, but the data module yields (images, targets) "
                              f"pairs. Use a kd_lightning data module, which yields indices.")

    def loss(self, inputs: DistillInputs) -> Tensor | dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement loss()")

    def sample_losses(self, inputs: DistillInputs) -> Tensor | None:
        """One unweighted loss per sample, shape (B,), whose mean is `loss`; None where the loss does not
        split over samples (relations between samples, memory banks). Schemes that weight samples (CA-MKD's
        teacher confidence) accept only terms that give them."""
        return None

    def init_loss(self, inputs: DistillInputs) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has init_epochs > 0 but no init_loss()")

    def init_parameters(self, student: nn.Module) -> list[nn.Parameter]:
        """Parameters the initialisation stage trains (default: the term's own)."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def init_only_parameters(self) -> list[nn.Parameter]:
        """Parameters that only the initialisation stage trains and the main stage keeps fixed."""
        return []

    def forward(self, inputs: DistillInputs) -> Tensor | dict[str, Tensor]:
        return self.loss(inputs)


def _expand(taps: Sequence[str], stages: Sequence[str], role: str) -> list[str]:
    out: list[str] = []
    for tap in taps:
        if tap in (STAGES, STAGES_PRE, LAST_STAGE) and not stages:
            raise ConfigError(
                f"The {role} model declares no stages, so the tap alias {tap!r} means nothing. Name its taps "
                f"explicitly as module paths (`kd_lightning.models.module_paths(model)` lists them; add ':input' "
                f"for a module's input), or use a kd_lightning zoo model."
            )
        if tap == STAGES:
            out.extend(stages)
        elif tap == STAGES_PRE:
            out.extend(f"{stage}_pre" for stage in stages)
        elif tap == LAST_STAGE:
            out.append(stages[-1])
        else:
            out.append(tap)
    return out


def as_tap_list(taps: str | Sequence[str]) -> list[str]:
    return [taps] if isinstance(taps, str) else list(taps)
