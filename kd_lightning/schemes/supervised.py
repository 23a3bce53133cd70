from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kd_lightning.schemes.base import DistillationModule


class Supervised(DistillationModule):
    """Cross-entropy training of one network: teachers, and the student baselines KD is compared with."""

    learns_without_labels = False

    trains_on_mixed_batches = True

    def __init__(self, student: nn.Module, num_classes: int, label_smoothing: float = 0.0,
                 labeled: Tensor | None = None, **base: Any) -> None:
        super().__init__(student, num_classes, **base)
        self.label_smoothing = label_smoothing
        self.hide_labels(labeled)

    def loss_summary(self) -> str:
        return f"loss = 1.0·CE(label_smoothing={self.label_smoothing})" if self.label_smoothing else "loss = 1.0·CE"

    def training_losses(self, images: Tensor, targets: Tensor, indices: Tensor | None) -> dict[str, Tensor]:
        logits = self.student(images)
        return {"ce": self.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)}
