"""DeiT: distillation through a distillation token (Touvron et al., ICML 2021)."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms.base import DistillTerm
from kd_lightning.schemes.offline import Offline
from kd_lightning.schemes.watch import NonFiniteWatch

DISTILLATION_TYPES = ("none", "soft", "hard")
DISTILLED_MODELS = ("deit_tiny_distilled_patch16_224, deit_small_distilled_patch16_224, "
                    "deit_base_distilled_patch16_224, deit_base_distilled_patch16_384")


def deit_soft_distillation(distill_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
    """facebookresearch/deit losses.py, `soft`: KL(teacher ‖ student) at temperature τ, summed, ×τ², divided by
    the number of logits (B·K, the reference's "legacy PyTorch" mean, not the batch size)."""
    kl = F.kl_div(F.log_softmax(distill_logits.float() / tau, dim=1),
                  F.log_softmax(teacher_logits.float() / tau, dim=1), reduction="sum", log_target=True)
    return kl * (tau * tau) / distill_logits.numel()


def deit_hard_distillation(distill_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """facebookresearch/deit losses.py, `hard`: CE of the distillation head to the teacher's argmax."""
    return F.cross_entropy(distill_logits.float(), teacher_logits.argmax(dim=1))


class DeiT(Offline):
    """Touvron et al., "Training data-efficient image transformers & distillation through attention" (ICML 2021);
    reference: facebookresearch/deit `losses.py` `DistillationLoss` with main.py's recipe.

    The student is a ViT with a class token and a distillation token, each with its own head (timm's
    `deit_*_distilled_*`, `VisionTransformerDistilled`): in training it returns (class logits, distillation
    logits) (`set_distilled_training(True)`), in eval mode their average, which validation, test, the exported
    file and any later stage read. Loss: (1 − alpha)·CE(class head, labels) + alpha·distill(distillation head,
    teacher), distill being `hard` (CE to the teacher's argmax), `soft` (KL at τ, `deit_soft_distillation`) or
    `none` (the CE alone, unweighted, as the reference returns it; the distillation head then never trains but
    still enters the eval-mode average). With mixed batches (data.mixup_alpha / cutmix_alpha) the CE reads their
    soft targets (the reference's SoftTargetCrossEntropy) and the teacher sees the same mixed input.

    Defaults are the reference's: alpha 0.5, tau 1.0; `hard` is the type its README trains DeiT⚗ with (main.py's
    argparse default is `none`, no distillation). The teacher may be any architecture; the paper's is a convnet
    (RegNetY-16GF), which it finds teaches a ViT best.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, terms: Mapping[str, DistillTerm], num_classes: int,
                 example_input: Any, distillation_type: str = "hard", alpha: float = 0.5, tau: float = 1.0,
                 ce_weight: float | None = None, **offline: Any) -> None:
        if distillation_type not in DISTILLATION_TYPES:
            raise ConfigError(f"scheme.distillation_type={distillation_type!r} is not a DeiT distillation type; "
                              f"choose one of {list(DISTILLATION_TYPES)} (hard: CE to the teacher's argmax, soft: "
                              f"KL at scheme.tau, none: the class head's CE alone).")
        if not 0 <= alpha <= 1 or not tau > 0:
            raise ConfigError(f"scheme.alpha={alpha} must be in [0, 1] (the distillation loss's share) and "
                              f"scheme.tau={tau} > 0 (DeiT: 0.5 and 1.0).")
        if ce_weight is not None:
            raise ConfigError(f"scheme.ce_weight={ce_weight}: DeiT weighs its class head's CE by 1 − scheme.alpha "
                              f"(and the distillation loss by alpha); set scheme.alpha instead.")
        if terms:
            raise ConfigError(f"scheme=deit trains its own loss on the distillation token, but distill={list(terms)} "
                              f"adds terms to it. Use distill=[] with scheme=deit, or scheme=offline for the terms.")
        if not (callable(getattr(student, "set_distilled_training", None)) and hasattr(student, "head_dist")):
            name = getattr(student, "kd_spec", {}).get("name", type(student).__name__)
            raise ConfigError(
                f"scheme=deit needs a student with a distillation token and its own head, but {name} has none. Use "
                f"one of timm's distilled DeiTs, student.name=timm:<model> with <model> one of {DISTILLED_MODELS} "
                f"(img_size, patch_size, embed_dim, depth, num_heads set to fit the data: student=deit_digits on "
                f"digits), or scheme=offline for any other student.")
        super().__init__(student, teacher, terms, num_classes, example_input, ce_weight=None, **offline)
        if distillation_type != "none":
            with torch.no_grad():
                width = int(self.teacher(example_input).shape[1])
            if width != num_classes:
                raise ConfigError(
                    f"scheme.distillation_type={distillation_type} compares the teacher's {width} logits with the "
                    f"student's {num_classes} classes, which needs one class set. Give the teacher this data's "
                    f"classes (a teacher trained on it, or teacher.model.num_classes={num_classes} with weights "
                    f"whose head is refitted), or distillation_type=none.")
        self.distillation_type, self.alpha, self.tau = distillation_type, float(alpha), float(tau)
        student.set_distilled_training(True)
        self.distill_name = f"deit_{distillation_type}"
        self.nonfinite = NonFiniteWatch(["ce", self.distill_name], {self.distill_name: "scheme.alpha"})

    def head_outputs(self, images: Any) -> tuple[Tensor, Tensor]:
        outputs = self.student(images)
        if not isinstance(outputs, tuple):
            raise RuntimeError("The DeiT student returned one output in training mode; its distilled training was "
                               "switched off (set_distilled_training(False)) after the scheme was built.")
        return outputs

    def training_losses(self, images: Any, targets: Tensor, indices: Tensor | None) -> dict[str, Tensor]:
        class_logits, distill_logits = self.head_outputs(images)
        base = self.cross_entropy(class_logits, targets)
        self.nonfinite.record("ce", base, self.global_step)
        if self.distillation_type == "none":
            return {"ce": base}
        teacher_logits, _ = self.teacher_logits_and_features(images)
        if self.distillation_type == "soft":
            distill = deit_soft_distillation(distill_logits, teacher_logits, self.tau)
        else:
            distill = deit_hard_distillation(distill_logits, teacher_logits)
        self.nonfinite.record(self.distill_name, distill, self.global_step)
        return {"ce": (1.0 - self.alpha) * base, self.distill_name: self.alpha * distill}

    def loss_summary(self) -> str:
        if self.distillation_type == "none":
            return "loss = 1.0·CE(class head); eval: mean of class and distillation heads"
        what = f"KL(T={self.tau})" if self.distillation_type == "soft" else "CE to teacher argmax"
        return (f"loss = {1.0 - self.alpha}·CE(class head) + {self.alpha}·{self.distill_name}(distillation head, "
                f"{what}); eval: mean of both heads")
