"""Multi-level logit distillation (MLKD): student and teacher each see a weak and a strong view of a sample."""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import DistillInputs, DistillTerm
from kd_lightning.schemes.composition import describe_loss
from kd_lightning.data.inputs import RoleInputs, input_name, pick
from kd_lightning.schemes.offline import Offline, weighted_term_losses
from kd_lightning.schemes.watch import NonFiniteWatch

MLKD_PARTS = ("instance", "class", "batch")


class MLKD(Offline):
    """Jin, Wang & Lin, CVPR 2023, "Multi-level Logit Distillation"; reference: Jin-Ying/Multi-Level-Logit-
    Distillation, mdistiller/distillers/KD_ours.py (the class the README calls MLKD) with its CIFAR-100 configs.

    Loss: ce_weight·(CE(s_w, y) + CE(s_s, y)) + kd_weight·(instance + class + batch) of `functional.mlkd_loss`,
    plus any `distill` terms on the weak view (none in the recipe). Recipe defaults (cfg.py, configs/cifar100/
    ours): CE 0.1, KD 0.9, T = 4 (the other temperatures 3, 5, 2, 6 are fixed in the reference), percentile 50,
    no warm-up; ImageNet's configs use CE 0.5, KD 0.5, T = 1.

    Inputs: the weak view is the input the student reads, the strong view the input `inputs.strong` names; the
    teacher sees both. conf/scheme/mlkd.yaml makes the strong view an own draw of a pad-2 crop (shifts of up to
    two pixels on digits; pad 8 is twice CIFAR's crop): the reference's strong view is RandAugment(2, 10) on top
    of crop/flip, which has no named views here. Each view costs one forward of each network, and the teacher's strong-
    view outputs have no key in the teacher-output cache, so the cache is refused.
    """

    caches_teacher_outputs: ClassVar[bool] = False

    def __init__(self, student: nn.Module, teacher: nn.Module, terms: Mapping[str, DistillTerm], num_classes: int,
                 example_input: Tensor, ce_weight: float | None = 0.1, kd_weight: float = 0.9,
                 temperature: float = 4.0, percentile: float = 50.0, inputs: RoleInputs | None = None,
                 **offline: Any) -> None:
        if not kd_weight >= 0 or not temperature > 0 or not 0 <= percentile <= 100:
            raise ConfigError(f"scheme.kd_weight={kd_weight} must be ≥ 0, scheme.temperature={temperature} > 0 and "
                              f"scheme.percentile={percentile} in [0, 100] (MLKD on CIFAR-100: 0.9, 4, 50).")
        strong = None if inputs is None else inputs.strong
        if strong is None or not isinstance(example_input, Mapping) or strong not in example_input:
            held = sorted(example_input) if isinstance(example_input, Mapping) else "one image tensor"
            raise ConfigError(
                f"scheme=mlkd trains the student and the teacher on two views of every sample, a weak and a strong "
                f"augmentation, but inputs.strong={strong!r} names no input of the batches (they hold {held}). Name "
                f"the strong view: inputs.strong=<view> with inputs.views.<view>={{draw: own, pad: <pixels>}} (what "
                f"conf/scheme/mlkd.yaml sets); README 'Cross-modal and cross-resolution'.")
        if input_name(student) == strong:
            raise ConfigError(
                f"The student reads the input {strong!r}, which inputs.strong also names as the strong view, so "
                f"MLKD's two views would be one. Point the student at the weak view (inputs.student), or "
                f"inputs.strong at another input (the batches hold {sorted(example_input)}).")
        super().__init__(student, teacher, terms, num_classes, example_input, ce_weight=ce_weight, **offline)
        self.kd_weight, self.temperature, self.percentile = float(kd_weight), float(temperature), float(percentile)
        self.strong_input = strong
        mlkd_names = [f"mlkd_{part}" for part in MLKD_PARTS]
        self.nonfinite = NonFiniteWatch([*self.nonfinite.names, *mlkd_names],
                                        {name: "scheme.kd_weight" for name in mlkd_names})

    def views(self, images: Tensor | Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(weak, strong): the student's own input and the strong view, out of a batch of named inputs."""
        if not isinstance(images, Mapping):
            raise ConfigError("scheme=mlkd was given a batch of one image tensor; it needs named inputs with a strong "
                              "view (inputs.strong). Train it through kd-train, which serves them.")
        return pick(images, self.student), images[self.strong_input]

    def training_losses(self, images: Any, targets: Tensor, indices: Tensor | None) -> dict[str, Tensor]:
        weak, strong = self.views(images)
        if self.init_stage:  # the terms' initialisation stages know one view only: the weak one
            return super().training_losses(weak, targets, indices)
        teacher_strong, student_strong = self.teacher(strong), self.student(strong)
        # The weak view's forwards run last, so the taps hold its features when the terms read them.
        teacher_weak, student_weak = self.teacher(weak), self.student(weak)
        ce = F.cross_entropy(student_weak.float(), targets) + F.cross_entropy(student_strong.float(), targets)
        self.nonfinite.record("ce", ce, self.global_step)
        parts = functional.mlkd_loss(student_weak, student_strong, teacher_weak, teacher_strong,
                                     self.temperature, self.percentile)
        losses = {"ce": self.ce_weight * ce}
        for part, value in parts.items():
            self.nonfinite.record(f"mlkd_{part}", value, self.global_step)
            losses[f"mlkd_{part}"] = self.kd_weight * value
        inputs = DistillInputs(student_logits=student_weak, targets=targets, indices=indices,
                               teacher_logits=teacher_weak, student_features=self.student_taps.features,
                               teacher_features=self.teacher_taps.features, epoch=self.current_epoch)
        return {**losses, **weighted_term_losses(self.terms, inputs, self.nonfinite, self.global_step)}

    def loss_summary(self) -> str:
        if self.init_stage:
            return super().loss_summary()
        temperatures = ", ".join(str(t) for t in (self.temperature, *functional.MLKD_EXTRA_TEMPERATURES))
        head = (f"loss = {self.ce_weight}·CE(weak + strong) + {self.kd_weight}·mlkd(T={temperatures}; instance + "
                f"class + batch, percentile {self.percentile})")
        return " + ".join([head, *describe_loss(self.ce_weight, self.terms).split(" + ")[1:]])
