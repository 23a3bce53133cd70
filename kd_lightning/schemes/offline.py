from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms.base import DistillInputs, DistillTerm
from kd_lightning.schemes.base import DistillationModule
from kd_lightning.taps import FeatureTaps, declared_taps
from kd_lightning.teachers import FrozenTeacher


class Offline(DistillationModule):
    """A frozen, pre-trained teacher; the student minimises ce_weight·CE + Σ weight_i·term_i.

    `example_input` (a small batch of the data's shape) is run once through both networks at
    construction, so tap names are checked and learnable adapters are sized before the optimizer exists.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, terms: Mapping[str, DistillTerm],
                 num_classes: int, example_input: Tensor, ce_weight: float = 1.0, **base: Any) -> None:
        super().__init__(student, num_classes, **base)
        # Kept outside the module tree on purpose: see FrozenTeacher.
        object.__setattr__(self, "teacher", teacher if isinstance(teacher, FrozenTeacher) else FrozenTeacher(teacher))
        self.terms = nn.ModuleDict(dict(terms))
        self.ce_weight = ce_weight
        for name, term in self.terms.items():
            if not isinstance(term, DistillTerm):
                raise ConfigError(f"distill.{name} built a {type(term).__name__}, not a DistillTerm; check its "
                                  f"_target_ in conf/distill/{name}.yaml.")
            term.expand_taps(declared_taps(student).stages, declared_taps(self.teacher.model).stages)
        self.student_taps = FeatureTaps(student, [t for term in self.terms.values() for t in term.student_taps],
                                        getattr(student, "kd_spec", {}).get("name", "student"))
        self.teacher_taps = FeatureTaps(self.teacher.model, [t for term in self.terms.values() for t in term.teacher_taps],
                                        getattr(self.teacher.model, "kd_spec", {}).get("name", "teacher"))
        self._build_terms(example_input)

    def _build_terms(self, example_input: Tensor) -> None:
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            self.student(example_input)
            self.teacher(example_input)
        self.student.train(was_training)
        student_shapes = {name: tensor.shape for name, tensor in self.student_taps.features.items()}
        teacher_shapes = {name: tensor.shape for name, tensor in self.teacher_taps.features.items()}
        for term in self.terms.values():
            term.build(student_shapes, teacher_shapes)
        self.student_taps.clear()
        self.teacher_taps.clear()

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "Offline":
        # Device and dtype moves (trainer setup, precision plugins) must reach the unregistered teacher.
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def training_losses(self, images: Tensor, targets: Tensor, indices: Tensor | None) -> dict[str, Tensor]:
        teacher_logits = self.teacher(images)
        student_logits = self.student(images)
        inputs = DistillInputs(
            student_logits=student_logits, targets=targets, indices=indices, teacher_logits=teacher_logits,
            student_features=self.student_taps.features, teacher_features=self.teacher_taps.features,
            epoch=self.current_epoch,
        )
        losses = {"ce": self.ce_weight * F.cross_entropy(student_logits.float(), targets)}
        for name, term in self.terms.items():
            if term.needs_indices and indices is None:
                raise ConfigError(f"Term {name!r} needs sample indices, but the data module yields (images, "
                                  f"targets) pairs. Use a kd_lightning data module, which yields indices.")
            factor = term.weight_at(self.current_epoch)
            value = term(inputs)
            if isinstance(value, Mapping):
                losses.update({f"{name}_{part}": factor * part_value for part, part_value in value.items()})
            else:
                losses[name] = factor * value
        return losses
