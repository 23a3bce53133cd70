from __future__ import annotations

from torch import Tensor

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import DistillInputs, DistillTerm


class Consistency(DistillTerm):
    """Tarvainen & Valpola, "Mean teachers are better role models" (NeurIPS 2017): the consistency cost.

    weight · r(epoch) · Σ (softmax(s) − softmax(t))² / (classes · batch) (`functional.softmax_mse`), with the
    sigmoid ramp-up r = exp(−5 (1 − epoch/rampup_epochs)²) of CuriousAI/mean-teacher (pytorch/main.py,
    evaluated at the integer epoch as there). Its CIFAR-10 recipe (experiments/cifar10_test.py): weight
    (`consistency`) 100, ramp-up 5 epochs. Any teacher works; `scheme=mean_teacher` makes it the student's EMA.
    """

    def __init__(self, weight: float = 100.0, rampup_epochs: int = 5) -> None:
        super().__init__(weight)
        if int(rampup_epochs) < 0:
            raise ConfigError(f"distill.consistency.rampup_epochs must be >= 0, got {rampup_epochs}.")
        self.rampup_epochs = int(rampup_epochs)

    def weight_at(self, epoch: int) -> float:
        return self.weight * functional.sigmoid_rampup(epoch, self.rampup_epochs)

    def loss(self, inputs: DistillInputs) -> Tensor:
        return functional.softmax_mse(inputs.student_logits, inputs.teacher_logits)
