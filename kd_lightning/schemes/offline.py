from __future__ import annotations

import warnings
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.data.inputs import pick
from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms.base import BuildContext, DistillInputs, DistillTerm
from kd_lightning.schemes.base import DistillationModule, batch_views, unpack_batch
from kd_lightning.schemes.composition import describe_init_loss, describe_loss, resolve_ce_weight
from kd_lightning.schemes.watch import NonFiniteWatch
from kd_lightning.taps import FeatureTaps, declared_taps
from kd_lightning.teacher_cache import OFF_SWITCH, LOGITS, TeacherCacheOptions, TeacherOutputCache, check_cacheable
from kd_lightning.teachers import FrozenTeacher

# Offline checks each batch in `on_before_batch_transfer`, on the host; Lightning reports any such override
# when the data comes from a LightningDataModule (which then simply does not define the hook).
warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer` in `LightningModule`")


class Offline(DistillationModule):
    """A frozen, pre-trained teacher; the student minimises ce_weight·CE + Σ weight_i·term_i.

    `ce_weight=None` takes the terms' common published CE weight (`schemes.composition`), and refuses
    terms whose recipes disagree (e.g. KD's 0.1 with CRD's 1) rather than picking one silently.

    Terms with `init_epochs > 0` get a first fit after `set_init_stage(True)`, in which only their
    `init_loss` trains their `init_parameters`, each term's at its own constant `init_lr` (None: the
    optimizer's); the pipeline then fits again for the main training.

    `example_input` (a small batch of the data's shape) is run once through both networks at
    construction, so tap names are checked and learnable adapters are sized before the optimizer exists.

    `teacher_cache` (the run's `teacher_cache` config) serves the teacher's logits and vector taps per
    (sample, view) from a `TeacherOutputCache`; schemes whose teacher's outputs change or that run other
    teachers set `caches_teacher_outputs = False` and refuse it.
    """

    caches_teacher_outputs: ClassVar[bool] = True
    trains_on_mixed_batches: ClassVar[bool] = True

    def __init__(self, student: nn.Module, teacher: nn.Module, terms: Mapping[str, DistillTerm],
                 num_classes: int, example_input: Tensor, ce_weight: float | None = None,
                 train_size: int | None = None, max_epochs: int | None = None, train_targets: Tensor | None = None,
                 teacher_cache: TeacherCacheOptions | None = None, labeled: Tensor | None = None,
                 **base: Any) -> None:
        super().__init__(student, num_classes, **base)
        self.hide_labels(labeled)
        # Kept outside the module tree on purpose: see FrozenTeacher.
        object.__setattr__(self, "teacher", teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher))
        self.terms = nn.ModuleDict(dict(terms))
        # While True, only the terms' initialisation losses train (FT paraphraser, AB connectors).
        self.init_stage = False
        for name, term in self.terms.items():
            if not isinstance(term, DistillTerm):
                raise ConfigError(f"distill.{name} built a {type(term).__name__}, not a DistillTerm; check its "
                                  f"_target_ in conf/distill/{name}.yaml.")
            term.expand_taps(declared_taps(student).stages, declared_taps(self.teacher.model).stages)
            term.resolve_model_taps(student, self.teacher.model)
        self.ce_weight = resolve_ce_weight(ce_weight, self.terms)
        readers = [name for name, term in self.terms.items() if term.reads_targets]
        if labeled is not None and readers:
            raise ConfigError(f"distill={readers} read every sample's label, but labeled_fraction < 1 hides most of them. "
                              f"Use terms that learn from the teacher alone (kd, fitnet, supervision_transfer, ...) or "
                              f"labeled_fraction=1.")
        self.student_taps = FeatureTaps(student, [t for term in self.terms.values() for t in term.student_taps],
                                        getattr(student, "kd_spec", {}).get("name", "student"))
        self.teacher_taps = FeatureTaps(self.teacher.model, [t for term in self.terms.values() for t in term.teacher_taps],
                                        getattr(self.teacher.model, "kd_spec", {}).get("name", "teacher"))
        context = BuildContext(student_shapes={}, teacher_shapes={}, student=student, teacher=self.teacher.model,
                               num_classes=num_classes, train_size=train_size, max_epochs=max_epochs,
                               train_targets=train_targets)
        self._build_terms(example_input, context)
        self.teacher_outputs = self._output_cache(teacher_cache, context)
        self.nonfinite = NonFiniteWatch(["ce", *self.terms, *(f"{name}_init" for name in self.init_terms)])
        self._trainable = {id(p) for p in self.parameters() if p.requires_grad}

    def check_mixed_batches(self) -> None:
        super().check_mixed_batches()
        keyed = [name for name, term in self.terms.items() if term.needs_indices]
        if keyed:
            raise ConfigError(
                f"distill={keyed} keep one memory slot per training sample (by index), but a mixed batch "
                f"(data.mixup_alpha / data.cutmix_alpha) blends two samples into each input, which no slot holds. "
                f"Train these terms on unmixed batches (data.mixup_alpha=0 data.cutmix_alpha=0).")

    def example_forward(self, example_input: Tensor) -> None:
        """One eval-mode, no-grad forward of student and teacher, so the forward hooks record output shapes."""
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            self.student(example_input)
            self.teacher(example_input)
        self.student.train(was_training)

    def _build_terms(self, example_input: Tensor, context: BuildContext) -> None:
        self.example_forward(example_input)
        context.student_shapes = {name: tensor.shape for name, tensor in self.student_taps.features.items()}
        context.teacher_shapes = {name: tensor.shape for name, tensor in self.teacher_taps.features.items()}
        for name, term in self.terms.items():
            term.build(context)
            term.check(name, context)
        self.student_taps.clear()
        self.teacher_taps.clear()

    def _output_cache(self, options: TeacherCacheOptions | None, context: BuildContext) -> TeacherOutputCache | None:
        if options is None:
            return None
        if not self.caches_teacher_outputs:
            raise ConfigError(f"scheme {type(self).__name__} cannot use the teacher cache: its teacher's outputs "
                              f"change during training or it runs several teachers. Train it with {OFF_SWITCH}.")
        taps = check_cacheable(context.teacher_shapes, {name: term.teacher_taps for name, term in self.terms.items()})
        widths = {LOGITS: self.num_classes, **{tap: int(context.teacher_shapes[tap][1]) for tap in taps}}
        return TeacherOutputCache(options, widths)

    def teacher_forward(self, images: Tensor) -> dict[str, Tensor]:
        """The teacher's logits and the tapped features the cache stores, from one forward."""
        logits = self.teacher(images)
        features = self.teacher_taps.features
        assert self.teacher_outputs is not None
        return {LOGITS: logits, **{name: features[name] for name in self.teacher_outputs.slices if name != LOGITS}}

    def teacher_logits_and_features(self, images: Tensor) -> tuple[Tensor, Mapping[str, Tensor]]:
        if self.teacher_outputs is None:
            return self.teacher(images), self.teacher_taps.features
        outputs = self.teacher_outputs.outputs(self.teacher_forward, pick(images, self.teacher))
        return outputs.pop(LOGITS), outputs

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.teacher_outputs is not None:
            trainer = self.trainer
            self.teacher_outputs.open(trainer.datamodule, self.teacher.model, self.teacher_forward, self.device,
                                      str(trainer.precision), trainer.precision_plugin.forward_context,
                                      trainer.global_rank, trainer.world_size,
                                      lambda: trainer.strategy.barrier("teacher-cache"))
            self.teacher_taps.clear()

    def set_init_stage(self, active: bool) -> None:
        """Switch between the terms' initialisation stage and the main training.

        Parameters the active stage does not train get requires_grad=False, so optimizers skip them and
        DDP does not wait for gradients that never come (the init stage trains only `init_parameters`;
        the main stage skips each term's `init_only_parameters`, e.g. FT's paraphraser).
        """
        self.init_stage = active
        if active:
            keep = {id(p) for term in self.init_terms.values() for p in term.init_parameters(self.student)}
        else:
            frozen = {id(p) for term in self.terms.values() for p in term.init_only_parameters()}
            keep = self._trainable - frozen
        for parameter in self.parameters():
            parameter.requires_grad_(id(parameter) in keep and id(parameter) in self._trainable)
        # Lightning keeps submodules in the mode it finds them, so undo the init stage's eval() here.
        self.train()

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "Offline":
        # Device and dtype moves (trainer setup, precision plugins) must reach the unregistered teacher.
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def loss_summary(self) -> str:
        return describe_init_loss(self.init_terms) if self.init_stage else describe_loss(self.ce_weight, self.terms)

    @property
    def init_epochs(self) -> int:
        return max((term.init_epochs for term in self.terms.values()), default=0)

    @property
    def init_terms(self) -> dict[str, DistillTerm]:
        return {name: term for name, term in self.terms.items() if term.init_epochs > 0}

    def configure_optimizers(self) -> Any:
        if self.init_stage:  # the reference init stages (RepDistiller) run at a constant learning rate
            return self.optimizer_factory(self._init_param_groups())
        return super().configure_optimizers()

    def _init_param_groups(self) -> list[dict[str, Any]]:
        """One param group per distinct `init_lr` (a group without "lr" takes the optimizer's)."""
        owner: dict[int, tuple[str, float | None]] = {}
        groups: dict[float | None, dict[int, nn.Parameter]] = {}
        for name, term in self.init_terms.items():
            for parameter in term.init_parameters(self.student):
                if not parameter.requires_grad:
                    continue
                first = owner.setdefault(id(parameter), (name, term.init_lr))
                if first[1] != term.init_lr:
                    raise ConfigError(
                        f"The init stages of {first[0]} (init_lr={first[1]}) and {name} (init_lr={term.init_lr}) "
                        f"train the same student parameters, which one optimizer cannot step at two learning "
                        f"rates. Give them one rate: distill.{first[0]}.init_lr=<lr> distill.{name}.init_lr=<lr> "
                        f"(null: optimizer.lr)."
                    )
                groups.setdefault(term.init_lr, {})[id(parameter)] = parameter
        return [{"params": list(params.values()), **({} if lr is None else {"lr": lr})}
                for lr, params in groups.items()]

    def training_losses(self, images: Tensor, targets: Tensor, indices: Tensor | None) -> dict[str, Tensor]:
        teacher_logits, teacher_features = self.teacher_logits_and_features(images)
        student_logits = self.student(images)
        inputs = DistillInputs(
            student_logits=student_logits, targets=targets, indices=indices, teacher_logits=teacher_logits,
            student_features=self.student_taps.features, teacher_features=teacher_features,
            epoch=self.current_epoch,
        )
        if self.init_stage:
            losses = {f"{name}_init": term.init_loss(inputs) for name, term in self.init_terms.items()}
            for name, value in losses.items():
                self.nonfinite.record(name, value, self.global_step)
            return losses
        ce = self.cross_entropy(student_logits, targets)
        self.nonfinite.record("ce", ce, self.global_step)
        return {"ce": self.ce_weight * ce, **weighted_term_losses(self.terms, inputs, self.nonfinite, self.global_step)}

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Still in host memory: a check here never waits for the device, as one in a term's loss would.
        if self.trainer.training:
            indices = unpack_batch(batch)[2]
            for name, term in self.terms.items():
                term.check_batch(name, indices)
            if self.teacher_outputs is not None:
                views = batch_views(batch)
                # Keyed by what the teacher saw: its own input's view.
                self.teacher_outputs.lookup(indices, views if views is None else pick(views, self.teacher))
        return batch

    def on_train_epoch_start(self) -> None:
        # An init stage that does not train the student (FT's paraphraser) must not move its BN statistics.
        if self.init_stage and not any(p.requires_grad for p in self.student.parameters()):
            self.student.eval()

    def release_features(self) -> None:
        """Drop the tapped tensors of the last forward: the autograd graph holds what backward needs and
        frees it; the taps would keep them (activations of a whole batch) alive until the next forward."""
        self.student_taps.clear()
        self.teacher_taps.clear()

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.release_features()

    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.release_features()

    def on_before_backward(self, loss: Tensor) -> None:
        self.release_features()


def weighted_term_losses(terms: Mapping[str, DistillTerm], inputs: DistillInputs, nonfinite: NonFiniteWatch,
                         step: int) -> dict[str, Tensor]:
    """Each term's weighted loss (or named parts) for one batch; shared by every scheme that composes terms."""
    losses: dict[str, Tensor] = {}
    for name, term in terms.items():
        factor = term.weight_at(inputs.epoch)
        value = term(inputs)
        parts = value if isinstance(value, Mapping) else {"": value}
        for part, part_value in parts.items():
            nonfinite.record(name, part_value, step)
            losses[f"{name}_{part}" if part else name] = factor * part_value
    return losses
