"""Several frozen teachers, one student: every term is applied once per teacher and the results aggregated."""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms.base import BuildContext, DistillInputs, DistillTerm
from kd_lightning.schemes.composition import describe_init_loss, describe_term
from kd_lightning.schemes.offline import Offline
from kd_lightning.schemes.watch import NonFiniteWatch
from kd_lightning.taps import FeatureTaps, declared_taps
from kd_lightning.teachers import FrozenTeacher

AGGREGATIONS = ("average", "confidence", "random")


def term_key(name: str, teacher_index: int) -> str:
    """Where teacher k's copy of term `name` lives in `self.terms`; the first teacher's keeps the plain name,
    so `Offline`'s bookkeeping (init stages, NaN names) reads it unchanged."""
    return name if teacher_index == 0 else f"{name}_teacher{teacher_index + 1}"


def confidence_weights(teacher_logits: Sequence[Tensor], targets: Tensor) -> Tensor:
    """CA-MKD's per-sample teacher weights (Zhang et al., ICASSP 2022), from each teacher's CE on the label.

    w_{k,i} = (1 − softmax over teachers of CE(z_k,i, y_i)) / (K − 1), shape (K, B): the teacher with the
    lower cross-entropy on the label gets the larger weight, and the weights of a sample sum to 1.
    Rorozhl/CA-MKD helper/loops.py (ensemble_method CAMKD) and distiller_zoo/CAMKD.py.
    """
    losses = torch.stack([F.cross_entropy(logits.float(), targets, reduction="none") for logits in teacher_logits])
    return (1.0 - F.softmax(losses, dim=0)) / (len(teacher_logits) - 1)


class MultiTeacher(Offline):
    """N frozen teachers (any architectures, each a product of its own stage) distil into one student.

    Loss: ce_weight·CE + Σ_terms weight·A_k(term_k), where term_k is the term between the student and
    teacher k (each teacher has its own copy of every term, so feature terms get one adapter per teacher)
    and A aggregates over the teachers:

    - `average`: the mean over teachers, the AVERAGE_LOSS ensemble of Rorozhl/CA-MKD (helper/loops.py).
      For KD this has the student gradient of KD towards the averaged soft targets, since the mean of
      KL(p_k ‖ q) and KL(mean p_k ‖ q) differ by a term without the student in it.
    - `confidence`: CA-MKD (Zhang, Chen & Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation",
      ICASSP 2022): Σ_{k,i} w_{k,i}·ℓ_{k,i} / (B·K) with the per-sample weights of `confidence_weights`
      and per-sample losses ℓ (`DistillTerm.sample_losses`: KD, FitNet). The 1/(B·K) is the reference
      code's (loops.py), so its weights (−a 1, −b 50) apply unchanged. The reference weights its feature
      loss by the teachers' heads applied to the adapted student feature; here every term shares the
      weights from the teachers' own logits.
    - `random`: one teacher per optimizer step, drawn from a generator seeded by (`selection_seed`,
      global step): identical on every DDP rank and after a resume, and only that teacher runs.

    Default recipe (`conf/scheme/multi_teacher.yaml`): the reference's CE 1 and KL 1 at T 4 (scripts/run.sh
    `-r 1 -a 1`, train_student.py `--kd_T 4`), not Hinton's CE 0.1 / KD 0.9 of single-teacher KD. The
    reference's loop (helper/loops.py `if epoch == 1:`) trains only γ·CE + α·KL in its first epoch, for every
    row, so a feature loss starts in epoch 2; here every term trains from the first epoch. Its FitNet-MKD row
    never trains the hint: AVERAGE_LOSS averages the hint losses through `torch.tensor(loss_hint_list)`, which
    has no gradient; `distill=[kd,fitnet]` here does train it.

    Teachers run one after another under no_grad, so memory grows by their outputs, not their graphs.
    Like `Offline`'s teacher, all of them stay outside the module tree (optimizer, checkpoint, DDP).
    """

    caches_teacher_outputs = False  # teachers 2..N run outside the cache

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], terms: Mapping[str, DistillTerm],
                 num_classes: int, example_input: Tensor, aggregation: str = "average", selection_seed: int = 0,
                 train_size: int | None = None, max_epochs: int | None = None, train_targets: Tensor | None = None,
                 **offline: Any) -> None:
        if aggregation not in AGGREGATIONS:
            raise ConfigError(f"scheme.aggregation={aggregation!r} is not one of {list(AGGREGATIONS)}: 'average' "
                              f"(mean over teachers), 'confidence' (CA-MKD) or 'random' (one teacher per step).")
        if len(teachers) < 2:
            raise ConfigError(f"scheme=multi_teacher needs at least two teachers, got {len(teachers)}. List them in "
                              f"teachers=[...], or use scheme=offline for one teacher.")
        check_teacher_outputs(teachers, num_classes, example_input)
        if aggregation == "confidence":
            unweighted = [name for name, term in terms.items() if type(term).sample_losses is DistillTerm.sample_losses]
            if unweighted:
                raise ConfigError(f"scheme.aggregation=confidence weights every sample's loss by each teacher's "
                                  f"confidence, but the terms {unweighted} do not split over samples. Use terms "
                                  f"that do (kd, fitnet), or scheme.aggregation=average.")
        copies = [{name: copy.deepcopy(term) for name, term in terms.items()} for _ in teachers]
        super().__init__(student, teachers[0], copies[0], num_classes, example_input, train_size=train_size,
                         max_epochs=max_epochs, train_targets=train_targets, **offline)
        self.aggregation = aggregation
        self.selection_seed = int(selection_seed)
        self.term_names = list(terms)
        # Teachers 2..N, kept outside the module tree for the same reasons as `self.teacher`.
        object.__setattr__(self, "other_teachers", [t if isinstance(t, FrozenTeacher) else FrozenTeacher(t)
                                                    for t in teachers[1:]])
        self.other_teacher_taps: list[FeatureTaps] = []
        context = dict(num_classes=num_classes, train_size=train_size, max_epochs=max_epochs,
                       train_targets=train_targets)
        for index, (teacher, own_terms) in enumerate(zip(self.other_teachers, copies[1:]), start=1):
            self._add_teacher(index, teacher, own_terms, example_input, context)
        names = ["ce", *self.term_names,
                 *(f"{key}_init" for key, term in self.terms.items() if term.init_epochs > 0)]
        self.nonfinite = NonFiniteWatch(names)
        self._trainable = {id(p) for p in self.parameters() if p.requires_grad}

    def _add_teacher(self, index: int, teacher: FrozenTeacher, terms: dict[str, DistillTerm], example_input: Tensor,
                     context: dict[str, Any]) -> None:
        """Size teacher `index`'s term copies against its own tap shapes and register them in `self.terms`."""
        for term in terms.values():
            term.expand_taps(declared_taps(self.student).stages, declared_taps(teacher.model).stages)
            term.resolve_model_taps(self.student, teacher.model)
        taps = FeatureTaps(teacher.model, [t for term in terms.values() for t in term.teacher_taps],
                           getattr(teacher.model, "kd_spec", {}).get("name", f"teacher{index + 1}"))
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            self.student(example_input)
            teacher(example_input)
        self.student.train(was_training)
        build = BuildContext(student_shapes={n: t.shape for n, t in self.student_taps.features.items()},
                             teacher_shapes={n: t.shape for n, t in taps.features.items()}, student=self.student,
                             teacher=teacher.model, **context)
        for name, term in terms.items():
            term.build(build)
            term.check(name, build)
            self.terms[term_key(name, index)] = term
        self.student_taps.clear()
        taps.clear()
        self.other_teacher_taps.append(taps)

    @property
    def all_teachers(self) -> list[FrozenTeacher]:
        return [self.teacher, *self.other_teachers]

    def teacher_terms(self, index: int) -> dict[str, DistillTerm]:
        return {name: self.terms[term_key(name, index)] for name in self.term_names}

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "MultiTeacher":
        super()._apply(fn, *args, **kwargs)
        for teacher in self.other_teachers:
            teacher._apply(fn, *args, **kwargs)
        return self

    def release_features(self) -> None:
        super().release_features()
        for taps in self.other_teacher_taps:
            taps.clear()

    def loss_summary(self) -> str:
        """The loss as computed: each term once, aggregated over the teachers (its copies `<term>_teacher<k>`
        are not separate losses), e.g. `loss = 1.0·CE + 1.0·mean over 2 teachers of kd(T=4.0)`."""
        if self.init_stage:
            return describe_init_loss(self.init_terms)
        count = len(self.all_teachers)
        parts = [f"{self.ce_weight}·CE"]
        for name in self.term_names:
            term = self.terms[name]
            loss = describe_term(name, term)
            if not term.main_stage_loss:
                parts.append(f"{name}(init stage only)")
            elif self.aggregation == "average":
                parts.append(f"{term.weight}·mean over {count} teachers of {loss}")
            elif self.aggregation == "confidence":
                parts.append(f"{term.weight}·Σ_k w_k·{loss}_k / {count} (CA-MKD confidence w over {count} teachers)")
            else:
                parts.append(f"{term.weight}·{loss} of one teacher drawn per step (of {count})")
        return "loss = " + " + ".join(parts)

    def chosen_teacher(self) -> int:
        generator = torch.Generator().manual_seed(self.selection_seed * 1_000_003 + self.global_step)
        return int(torch.randint(len(self.all_teachers), (1,), generator=generator))

    def training_losses(self, images: Tensor, targets: Tensor, indices: Tensor | None) -> dict[str, Tensor]:
        student_logits = self.student(images)
        student_features = self.student_taps.features
        running = [self.chosen_teacher()] if self.aggregation == "random" else range(len(self.all_teachers))
        teacher_taps = [self.teacher_taps, *self.other_teacher_taps]
        inputs: dict[int, DistillInputs] = {}
        for index in running:  # one teacher at a time; each keeps only its logits and tapped features
            teacher_logits = self.all_teachers[index](images)
            inputs[index] = DistillInputs(student_logits=student_logits, targets=targets, indices=indices,
                                          teacher_logits=teacher_logits, student_features=student_features,
                                          teacher_features=teacher_taps[index].features, epoch=self.current_epoch)
        if self.init_stage:
            losses = {f"{term_key(name, index)}_init": term.init_loss(inputs[index])
                      for index in inputs for name, term in self.teacher_terms(index).items() if term.init_epochs > 0}
            for name, value in losses.items():
                self.nonfinite.record(name, value, self.global_step)
            return losses
        ce = F.cross_entropy(student_logits.float(), targets)
        self.nonfinite.record("ce", ce, self.global_step)
        losses = {"ce": self.ce_weight * ce}
        weights = (confidence_weights([i.teacher_logits for i in inputs.values()], targets)
                   if self.aggregation == "confidence" else None)
        for name in self.term_names:
            term = self.terms[name]
            for part, value in self._aggregate(name, inputs, weights).items():
                self.nonfinite.record(name, value, self.global_step)
                losses[f"{name}_{part}" if part else name] = term.weight_at(self.current_epoch) * value
        return losses

    def _aggregate(self, name: str, inputs: dict[int, DistillInputs], weights: Tensor | None) -> dict[str, Tensor]:
        if weights is not None:
            per_sample = torch.stack([self.terms[term_key(name, k)].sample_losses(x) for k, x in inputs.items()])
            return {"": (weights * per_sample).sum() / per_sample.numel()}
        values = [self.terms[term_key(name, k)](x) for k, x in inputs.items()]
        parts = [value if isinstance(value, Mapping) else {"": value} for value in values]
        aggregated = {part: torch.stack([p[part] for p in parts]).mean() for part in parts[0]}
        if self.aggregation == "random":
            # The other teachers' adapters get a zero gradient instead of none, so DDP (which expects a
            # gradient for every trainable parameter) and one process take the same step.
            idle = [p for k in range(len(self.all_teachers)) if k not in inputs
                    for p in self.terms[term_key(name, k)].parameters() if p.requires_grad]
            if idle:
                first = next(iter(aggregated))
                aggregated[first] = aggregated[first] + 0.0 * sum(p.sum() for p in idle)
        return aggregated


def check_teacher_outputs(teachers: Sequence[nn.Module], num_classes: int, example_input: Tensor) -> None:
    """Every teacher must take the data's images and predict its classes; say which one does not."""
    for index, teacher in enumerate(teachers, start=1):
        model = teacher.model if isinstance(teacher, FrozenTeacher) else teacher
        name = getattr(model, "kd_spec", {}).get("name", type(model).__name__)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(example_input)
        except RuntimeError as error:
            raise ConfigError(f"Teacher {index} ({name}) cannot take this data's images of shape "
                              f"{tuple(example_input.shape[1:])}: {str(error).splitlines()[0]}. Give every teacher "
                              f"the data set's in_channels (or use one trained on this data).") from None
        finally:
            model.train(was_training)
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            raise ConfigError(f"Teacher {index} ({name}) predicts {tuple(logits.shape[1:])} outputs, but the data "
                              f"has {num_classes} classes. Every teacher of scheme=multi_teacher must be trained on "
                              f"the student's classes: check its checkpoint and model config.")
