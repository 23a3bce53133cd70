"""Multilayer perceptrons for feature-vector inputs (B×D, `in_channels` = D), such as the mfeat sources.

Each hidden layer is a stage: Linear → (BatchNorm1d) → ReLU, the ReLU a separate non-inplace module like
every zoo block's, so `stageK_pre` (the ReLU's input) and `stageK` (its output) are both readable taps;
dropout, when on, follows each stage's ReLU and so is outside both. `penultimate` is the classifier's input,
as in every model family. Not from a paper: sized so the mfeat teacher clearly beats the student on the
pixels source in seconds on a CPU (see the factories).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.models import register_model
from kd_lightning.taps import Taps

# Registration metadata: these models read one feature vector per sample, not an image.
VECTOR_INPUT = {"inputs": "vectors"}


class MLP(nn.Module):
    """`hidden` widths of ReLU layers, then a linear classifier; `dropout` after each hidden layer's ReLU."""

    def __init__(self, num_classes: int, in_channels: int, hidden: Sequence[int], dropout: float = 0.0,
                 batch_norm: bool = False) -> None:
        super().__init__()
        widths = [int(width) for width in hidden]
        if any(width < 1 for width in widths) or int(in_channels) < 1:
            raise ConfigError(f"An MLP needs positive widths: in_channels={in_channels}, hidden={list(hidden)}. Give "
                              f"hidden as a list of positive layer widths, e.g. [256, 128].")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"MLP dropout must be in [0, 1), got {dropout!r}.")
        self.in_features = int(in_channels)
        self.depth = len(widths)
        previous = self.in_features
        for k, width in enumerate(widths, start=1):
            # BatchNorm's shift makes the linear layer's bias redundant.
            layers: list[nn.Module] = [nn.Linear(previous, width, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU())
            self.add_module(f"stage{k}", nn.Sequential(*layers))
            previous = width
        self.dropout = nn.Dropout(float(dropout)) if dropout else nn.Identity()
        self.fc = nn.Linear(previous, num_classes)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"stage{k}") for k in range(1, self.depth + 1)]

    def declared_taps(self) -> Taps:
        points = {"penultimate": "fc:input"}
        for k, stage in enumerate(self.stages(), start=1):
            points[f"stage{k}"] = f"stage{k}"
            points[f"stage{k}_pre"] = f"stage{k}.{len(stage) - 1}:input"
        return Taps(points=points, stages=tuple(f"stage{k}" for k in range(1, self.depth + 1)))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ConfigError(f"This MLP reads feature vectors of {self.in_features} values (a B×{self.in_features} "
                              f"batch), but got an input of shape {tuple(x.shape)}. Use it on a data set of feature "
                              f"vectors (data=mfeat) and build it with that input's width as in_channels, or choose "
                              f"a convnet for images.")
        for stage in self.stages():
            x = self.dropout(stage(x))
        return self.fc(x)


@register_model("mlp", **VECTOR_INPUT)
def mlp(num_classes: int, in_channels: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.0,
        batch_norm: bool = False) -> MLP:
    """Any depth and widths: `hidden` lists the hidden layers' widths."""
    return MLP(num_classes, in_channels, hidden, dropout, batch_norm)


@register_model("mlp_small", **VECTOR_INPUT)
def mlp_small(num_classes: int, in_channels: int, hidden: Sequence[int] = (16, 16), dropout: float = 0.0,
              batch_norm: bool = False) -> MLP:
    """Student: two hidden layers of 16 (4.3k parameters on mfeat's 240 pixels). Chosen on the validation split
    (seeds 0 and 1) to trail mlp_large by about 1.5 points, so distillation has something to transfer: widths 32
    came within noise of the teacher, widths 8 trailed it by 3."""
    return MLP(num_classes, in_channels, hidden, dropout, batch_norm)


@register_model("mlp_large", **VECTOR_INPUT)
def mlp_large(num_classes: int, in_channels: int, hidden: Sequence[int] = (512, 256), dropout: float = 0.3,
              batch_norm: bool = False) -> MLP:
    """Teacher: hidden layers of 512 and 256 with dropout 0.3 (257k parameters on mfeat's 240 pixels)."""
    return MLP(num_classes, in_channels, hidden, dropout, batch_norm)


__all__ = ["MLP", "VECTOR_INPUT", "mlp", "mlp_large", "mlp_small"]
