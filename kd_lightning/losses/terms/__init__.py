"""Distillation terms. Each is an `nn.Module` named in `conf/distill/<name>.yaml` by its `_target_`."""

from kd_lightning.losses.terms.at import AT
from kd_lightning.losses.terms.base import BuildContext, DistillInputs, DistillTerm
from kd_lightning.losses.terms.fitnet import FitNet
from kd_lightning.losses.terms.kd import KD

__all__ = ["AT", "BuildContext", "DistillInputs", "DistillTerm", "FitNet", "KD"]
