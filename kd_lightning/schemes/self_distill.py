"""Self-distillation: a network taught by itself — its deepest head (BYOT), its own predictions on
same-class samples (CS-KD), a hand-made virtual teacher (Tf-KD_reg), or its moving average (mean
teacher). Tf-KD_self needs no scheme of its own: `Offline` with a teacher stage of the student's
architecture (`kd_lightning.stages.tf_kd_self_plan`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from kd_lightning.data.base import CLASS_PAIRS
from kd_lightning.data.inputs import RoleInputs, attach_input, select
from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import BuildContext, DistillInputs, DistillTerm
from kd_lightning.schemes.base import DistillationModule
from kd_lightning.schemes.composition import describe_loss
from kd_lightning.schemes.offline import Offline, weighted_term_losses
from kd_lightning.schemes.watch import NonFiniteWatch
from kd_lightning.taps import FeatureTaps, declared_taps

EMA_CHECKPOINT_KEY = "mean_teacher_ema"


def _branch_bottleneck(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    # The reference side branch (luanyunteng `branchBottleNeck`): 1×1 to c_out/4, k×k stride k, 1×1 to c_out.
    middle = max(1, c_out // 4)
    return nn.Sequential(
        nn.Conv2d(c_in, middle, 1), nn.BatchNorm2d(middle), nn.ReLU(),
        nn.Conv2d(middle, middle, stride, stride), nn.BatchNorm2d(middle), nn.ReLU(),
        nn.Conv2d(middle, c_out, 1), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class AuxiliaryHead(nn.Module):
    """A shallow classifier on one stage: bottleneck branch → global pool (the hinted feature) → linear."""

    def __init__(self, in_channels: int, feature_dim: int, num_classes: int, stride: int) -> None:
        super().__init__()
        self.branch = _branch_bottleneck(in_channels, feature_dim, stride)
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, stage_output: Tensor) -> tuple[Tensor, Tensor]:
        feature = F.adaptive_avg_pool2d(self.branch(stage_output), 1).flatten(1)
        return self.fc(feature), feature


class BYOT(DistillationModule):
    """Zhang et al., "Be Your Own Teacher: Improve the Performance of CNNs via Self Distillation" (ICCV 2019).

    A head on every declared stage but the deepest; the network's own output teaches them:
    (1 − α)·(CE_deep + Σ CE_head) + α·Σ T²·softCE(head ‖ deep) + β·Σ hint(head feature, deep feature),
    deep outputs detached. Follows luanyunteng/pytorch-be-your-own-teacher (train.py, models/resnet.py;
    the authors released none): its side branch, its masked summed feature L2 against the pooled
    penultimate feature, its cross-entropy form of the KD term, and α 0.1, T 3, β 1e-6. Heads train with
    the network and are saved in checkpoints but not exported: the product is the deepest classifier.
    """

    trains_on_mixed_batches = True  # every CE takes class probabilities

    def __init__(self, student: nn.Module, num_classes: int, example_input: Tensor, alpha: float = 0.1,
                 temperature: float = 3.0, beta: float = 1e-6, stages: Sequence[str] | None = None,
                 **base: Any) -> None:
        super().__init__(student, num_classes, **base)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"scheme.alpha={alpha} must be in [0, 1]: it splits the loss between cross-entropy "
                              f"(1 - alpha) and the deepest head's soft targets (alpha; BYOT uses 0.1).")
        self.alpha, self.temperature, self.beta = float(alpha), float(temperature), float(beta)
        name = getattr(student, "kd_spec", {}).get("name", type(student).__name__)
        declared = declared_taps(student)
        self.head_stages = list(stages) if stages else list(declared.stages[:-1])
        if not self.head_stages:
            raise ConfigError(
                f"BYOT attaches its shallow heads to the stages a model declares, but model {name!r} declares "
                f"{'no stages' if not declared.stages else 'only one stage ' + repr(declared.stages[0])}, so there "
                f"is nothing below the deepest classifier to teach. Use a zoo model (resnet*, wrn_*, vgg*, "
                f"convnet_*), or name tap points for the heads with scheme.stages=[<module path>, ...].")
        # The deepest stage's resolution sets each branch's stride, as the reference's 8/4/2 on ResNet-18.
        deepest = declared.stages[-1:] if declared.stages else []
        self.taps = FeatureTaps(student, [*self.head_stages, *deepest, "penultimate"], name)
        was_training = student.training
        student.eval()
        with torch.no_grad():
            student(example_input)
        student.train(was_training)
        shapes = {tap: feature.shape for tap, feature in self.taps.features.items()}
        self.taps.clear()
        maps = [shape for shape in shapes.values() if len(shape) == 4]
        self.heads = nn.ModuleDict()
        for stage in self.head_stages:
            if len(shapes[stage]) != 4:
                raise ConfigError(f"BYOT head on {stage!r} of {name!r} needs a feature map (N×C×H×W), got shape "
                                  f"{tuple(shapes[stage])}. Choose convolutional stages in scheme.stages.")
            stride = max(1, shapes[stage][-1] // min(shape[-1] for shape in maps))
            self.heads[stage] = AuxiliaryHead(shapes[stage][1], shapes["penultimate"][1], num_classes, stride)
        self.nonfinite = NonFiniteWatch(["ce", *(f"{kind}_{s}" for s in self.head_stages for kind in ("ce", "kd", "hint"))])

    def loss_summary(self) -> str:
        heads = len(self.head_stages)
        return (f"loss = {1.0 - self.alpha:g}·(CE + Σ over {heads} heads of CE) + {self.alpha:g}·Σ over {heads} heads "
                f"of T²·softCE(deepest → head, T={self.temperature}) + {self.beta:g}·Σ over {heads} heads of hint")

    def training_losses(self, images: Tensor, targets: Tensor, indices: Tensor | None) -> dict[str, Tensor]:
        deep_logits = self.student(images)
        features = self.taps.features
        deep_feature = features["penultimate"].detach()
        keep = 1.0 - self.alpha
        losses = {"ce": keep * F.cross_entropy(deep_logits.float(), targets)}
        for stage, head in self.heads.items():
            head_logits, head_feature = head(features[stage])
            losses[f"ce_{stage}"] = keep * F.cross_entropy(head_logits.float(), targets)
            losses[f"kd_{stage}"] = self.alpha * functional.soft_cross_entropy(head_logits, deep_logits.detach(),
                                                                               self.temperature)
            losses[f"hint_{stage}"] = self.beta * functional.byot_feature_hint(head_feature, deep_feature)
        self.taps.clear()
        for name, value in losses.items():
            self.nonfinite.record(name, value, self.global_step)
        return losses


class CSKD(DistillationModule):
    """Yun et al., "Regularizing Class-wise Predictions via Self-knowledge Distillation" (CVPR 2020).

    Batches are anchors then one same-class partner each (`kd_lightning.data.pairs`); the loss is
    ce_weight·CE(anchors) + λ·T²·KL(p(partner)/T ‖ p(anchor)/T), the partners' forward under no_grad (in
    train mode, so it moves BatchNorm statistics as the reference's does). Follows alinlab/cs-kd train.py:
    T 4, λ 1 (CIFAR; 3 on fine-grained sets). Its CIFAR-100 recipe (SGD 0.1, momentum 0.9, wd 1e-4, 128
    anchors per step, 200 epochs, ÷10 from epochs 101 and 151) is `experiment=schemes/cs_kd_cifar100`;
    `scheme=cs_kd` alone trains with the run's optimizer and schedule. Logit terms of the catalogue
    (`distill=[dkd]`, ...) compose, with the partners' logits as the teacher's; terms that read features
    have no teacher network here.
    """

    train_batches = CLASS_PAIRS

    def __init__(self, student: nn.Module, num_classes: int, temperature: float = 4.0, lambda_cls: float = 1.0,
                 ce_weight: float = 1.0, terms: Mapping[str, DistillTerm] | None = None,
                 max_epochs: int | None = None, **base: Any) -> None:
        super().__init__(student, num_classes, **base)
        self.temperature, self.lambda_cls, self.ce_weight = float(temperature), float(lambda_cls), float(ce_weight)
        self.terms = nn.ModuleDict(dict(terms or {}))
        for name, term in self.terms.items():
            if term.student_taps or term.teacher_taps or term.needs_indices:
                raise ConfigError(f"distill.{name} reads features or sample indices, but CS-KD's teacher is the "
                                  f"network's own prediction on a partner sample: only logit terms (kd, dkd, dist, "
                                  f"kd_ls) compose with scheme=cs_kd. Remove {name} from distill.")
            context = BuildContext(student_shapes={}, teacher_shapes={}, num_classes=num_classes, max_epochs=max_epochs)
            term.build(context)
            term.check(name, context)
        self.nonfinite = NonFiniteWatch(["ce", "cs_kd", *self.terms])

    def loss_summary(self) -> str:
        terms = describe_loss(self.ce_weight, self.terms).split(" + ")[1:]
        return " + ".join([f"loss = {self.ce_weight}·CE(anchors)",
                           f"{self.lambda_cls}·cs_kd(T={self.temperature}, partner → anchor)", *terms])

    def training_losses(self, images: Tensor, targets: Tensor, indices: Tensor | None) -> dict[str, Tensor]:
        half = len(targets) // 2
        if half == 0 or len(targets) % 2:
            raise ConfigError(f"CS-KD got a batch of {len(targets)} samples; it needs anchors and their partners in "
                              f"equal halves. Train it through kd-train (scheme=cs_kd), whose data module pairs them.")
        logits = self.student(select(images, slice(0, half)))
        with torch.no_grad():
            partner_logits = self.student(select(images, slice(half, None)))
        ce = F.cross_entropy(logits.float(), targets[:half])
        class_kd = functional.kd(logits, partner_logits, self.temperature)
        self.nonfinite.record("ce", ce, self.global_step)
        self.nonfinite.record("cs_kd", class_kd, self.global_step)
        inputs = DistillInputs(student_logits=logits, targets=targets[:half], teacher_logits=partner_logits,
                               indices=None if indices is None else indices[:half], epoch=self.current_epoch)
        return {"ce": self.ce_weight * ce, "cs_kd": self.lambda_cls * class_kd,
                **weighted_term_losses(self.terms, inputs, self.nonfinite, self.global_step)}


class TfKDReg(DistillationModule):
    """Yuan et al., "Revisiting Knowledge Distillation via Label Smoothing Regularization" (CVPR 2020), Tf-KD_reg.

    (1 − α)·CE + α·`functional.tf_kd_reg` — KL from a virtual teacher with `correct_prob` on the true
    class, computed as the reference `loss_kd_regularization` does (temperature on the teacher only,
    mean over batch and classes; see the function). ResNet-18/CIFAR-100 recipe: α 0.1, T 20, multiplier 100.
    """

    def __init__(self, student: nn.Module, num_classes: int, alpha: float = 0.1, temperature: float = 20.0,
                 multiplier: float = 100.0, correct_prob: float = 0.99, temper_student: bool = False,
                 **base: Any) -> None:
        super().__init__(student, num_classes, **base)
        if not 0.0 <= alpha <= 1.0 or not 0.0 < correct_prob < 1.0:
            raise ConfigError(f"scheme.alpha={alpha} must be in [0, 1] and scheme.correct_prob={correct_prob} in "
                              f"(0, 1): the virtual teacher puts correct_prob on the true class (Tf-KD: 0.99).")
        self.alpha, self.temperature, self.multiplier = float(alpha), float(temperature), float(multiplier)
        self.correct_prob, self.temper_student = float(correct_prob), bool(temper_student)

    def loss_summary(self) -> str:
        return (f"loss = {1.0 - self.alpha:g}·CE + {self.alpha:g}·tf_kd_reg(T={self.temperature}, multiplier "
                f"{self.multiplier:g}, correct_prob {self.correct_prob:g})")

    def training_losses(self, images: Tensor, targets: Tensor, indices: Tensor | None) -> dict[str, Tensor]:
        logits = self.student(images)
        regulariser = functional.tf_kd_reg(logits, targets, self.temperature, self.multiplier, self.correct_prob,
                                           self.temper_student)
        return {"ce": (1.0 - self.alpha) * F.cross_entropy(logits.float(), targets),
                "tf_kd_reg": self.alpha * regulariser}


class MeanTeacher(Offline):
    """Tarvainen & Valpola, "Mean teachers are better role models" (NeurIPS 2017), as self-distillation.

    The teacher is an exponential moving average of the student's parameters, held in an
    `AveragedModel(student)` outside the module tree, optimizer and DDP, saved in checkpoints under
    `mean_teacher_ema` (so a resumed run continues the same average). Follows CuriousAI/mean-teacher
    (pytorch/main.py; CIFAR-10 recipe pytorch/experiments/cifar10_test.py):

    - the average is updated after every optimizer step (accumulation steps do not count) with
      α = min(1 − 1/(n + 1), ema_decay) at the n-th update, `update_ema_variables`' warm-up, and covers the
      parameters only: the teacher's BatchNorm statistics are its own;
    - the teacher runs in train mode (`ema_model.train()`), so it normalises with its batch's statistics
      and moves its own running statistics, as the reference's does; it stays frozen and gets no gradient.
      A term's init stage (FT, AB) reads it in eval mode, as RepDistiller's init stages read their teacher;
    - with `logit_distance_cost` ≥ 0 (CIFAR-10: .01) the student has a second classifier on its penultimate
      feature, the consistency head: CE trains the class logits, every `distill` term (the consistency
      cost) reads the consistency logits, and cost·Σ(class − consistency)²/(classes·batch) ties the two
      (`symmetric_mse_loss`). The head trains with the network, is checkpointed, and is not exported.
      `null` (the reference's default −1) distils the class logits themselves.

    The reference gives the teacher an independent augmentation of each image (`(input, ema_input)`): here
    `inputs.ema_teacher=<view>` with `inputs.views.<view>.draw=own` does (README, "Cross-modal and
    cross-resolution"); without it both networks see the same augmented batch. Where it differs: its EMA starts from an independent initialisation; here from the student's own
    initial weights. The run's optimizer and schedule are used (the reference: SGD 0.05 Nesterov, wd 2e-4,
    cosine ramp-down over 210 epochs), and the product is the student, where the paper reports the EMA.
    Every catalogue term composes; the default is the consistency cost (`distill=[consistency]`).
    """

    caches_teacher_outputs = False  # the averaged teacher changes after every step

    def __init__(self, student: nn.Module, terms: Mapping[str, DistillTerm], num_classes: int,
                 example_input: Tensor, ema_decay: float = 0.97, logit_distance_cost: float | None = 0.01,
                 inputs: RoleInputs | None = None, **offline: Any) -> None:
        if not 0.0 < float(ema_decay) < 1.0:
            raise ConfigError(f"scheme.ema_decay={ema_decay} must lie strictly between 0 and 1: at 0 the teacher "
                              f"is the student itself, at 1 it never leaves its initialisation (mean teacher uses "
                              f"0.97 on CIFAR-10, 0.999 on ImageNet).")
        if logit_distance_cost is not None and float(logit_distance_cost) < 0:
            raise ConfigError(f"scheme.logit_distance_cost={logit_distance_cost} must be >= 0 (the weight of the "
                              f"distance between the class and consistency heads; CIFAR-10: 0.01), or null for "
                              f"one head.")
        # Parameters only: the teacher's BatchNorm statistics come from its own train-mode forwards.
        ema = AveragedModel(student, use_buffers=False)
        ema.requires_grad_(False).eval()
        if inputs is not None and inputs.ema_teacher is not None:
            attach_input(ema.module, inputs.ema_teacher)  # e.g. an independent draw of the student's view
        super().__init__(student, ema.module, terms, num_classes, example_input, **offline)
        object.__setattr__(self, "ema", ema)  # outside the module tree, like the teacher it holds
        self.ema_decay = float(ema_decay)
        # Kept on the host so the per-step α needs no read from the device; restored from n_averaged on load.
        self._ema_updates = 0
        self.logit_distance_cost = None if logit_distance_cost is None else float(logit_distance_cost)
        self.consistency_head: nn.Module | None = None
        if self.logit_distance_cost is not None:
            name = getattr(student, "kd_spec", {}).get("name", "student")
            self.head_taps = FeatureTaps(student, ["penultimate"], name)
            self.example_forward(example_input)
            width = self.head_taps.features["penultimate"].flatten(1).shape[1]
            self.head_taps.clear()
            self.consistency_head = nn.Linear(width, num_classes)
            self._trainable |= {id(p) for p in self.consistency_head.parameters()}
            self.nonfinite = NonFiniteWatch([*self.nonfinite.names, "residual"])

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "MeanTeacher":
        super()._apply(fn, *args, **kwargs)
        if "ema" in self.__dict__:  # the step counter; the averaged weights moved with the teacher
            nn.Module._apply(self.ema, fn, recurse=False)
        return self

    def teacher_logits_and_features(self, images: Tensor) -> tuple[Tensor, Mapping[str, Tensor]]:
        # An init stage (FT, AB) trains a term's own module against the teacher as RepDistiller does, with an
        # eval-mode teacher; only the mean-teacher training itself follows main.py's train-mode EMA.
        if self.init_stage:
            return super().teacher_logits_and_features(images)
        # CuriousAI main.py runs `ema_model.train()`: batch statistics, and its own running averages move.
        # FrozenTeacher pins eval mode against any parent's train(), so the mode is set on its model here.
        self.teacher.model.train()
        try:
            logits = self.teacher(images)
        finally:
            self.teacher.model.eval()
        return logits, self.teacher_taps.features

    def training_losses(self, images: Tensor, targets: Tensor, indices: Tensor | None) -> dict[str, Tensor]:
        if self.init_stage or self.consistency_head is None:
            return super().training_losses(images, targets, indices)
        teacher_logits, teacher_features = self.teacher_logits_and_features(images)
        class_logits = self.student(images)
        consistency_logits = self.consistency_head(self.head_taps.features["penultimate"].flatten(1))
        inputs = DistillInputs(
            student_logits=consistency_logits, targets=targets, indices=indices, teacher_logits=teacher_logits,
            student_features=self.student_taps.features, teacher_features=teacher_features, epoch=self.current_epoch,
        )
        ce = F.cross_entropy(class_logits.float(), targets)
        # symmetric_mse_loss / minibatch size: both heads move towards each other.
        residual = (class_logits.float() - consistency_logits.float()).pow(2).sum() / class_logits.numel()
        self.nonfinite.record("ce", ce, self.global_step)
        self.nonfinite.record("residual", residual, self.global_step)
        return {"ce": self.ce_weight * ce, "residual": self.logit_distance_cost * residual,
                **weighted_term_losses(self.terms, inputs, self.nonfinite, self.global_step)}

    def release_features(self) -> None:
        super().release_features()
        if self.consistency_head is not None:
            self.head_taps.clear()

    def loss_summary(self) -> str:
        summary = super().loss_summary()
        if self.init_stage or self.consistency_head is None:
            return summary
        return (f"{summary} + {self.logit_distance_cost}·residual (class ↔ consistency head; the terms read the "
                f"consistency head)")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if not self.init_stage:
            self.update_teacher()

    @torch.no_grad()
    def update_teacher(self) -> None:
        """CuriousAI's update_ema_variables after its n-th step: ema ← α·ema + (1 − α)·θ, α = min(1 − 1/(n + 1),
        decay), the true average of the weights so far until the exponential one weighs the past more."""
        self._ema_updates += 1
        alpha = min(1.0 - 1.0 / (self._ema_updates + 1), self.ema_decay)
        averaged = list(self.ema.module.parameters())
        # One fused kernel per operation over all parameters (what torch's own EMA helper does), not two per tensor.
        torch._foreach_mul_(averaged, alpha)
        torch._foreach_add_(averaged, [p.detach().to(a.dtype) for a, p in zip(averaged, self.student.parameters())],
                            alpha=1.0 - alpha)
        self.ema.n_averaged += 1

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[EMA_CHECKPOINT_KEY] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if EMA_CHECKPOINT_KEY not in checkpoint:
            raise ConfigError("This checkpoint holds no mean-teacher average (key 'mean_teacher_ema'), so resuming "
                              "would restart the teacher from the student. Resume from a checkpoint written by "
                              "scheme=mean_teacher.")
        if self.consistency_head is not None and not any(key.startswith("consistency_head.")
                                                         for key in checkpoint.get("state_dict", {})):
            raise ConfigError("This checkpoint was written by a mean teacher without a consistency head (before "
                              "the head existed, or with scheme.logit_distance_cost=null), but this run builds one "
                              "(scheme.logit_distance_cost="
                              f"{self.logit_distance_cost}). Resume it with scheme.logit_distance_cost=null, or "
                              "start a new run to train with the head.")
        self.ema.load_state_dict(checkpoint[EMA_CHECKPOINT_KEY])
        self._ema_updates = int(self.ema.n_averaged)
