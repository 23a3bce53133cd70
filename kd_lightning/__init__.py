"""kd_lightning: knowledge distillation on PyTorch Lightning + Hydra.

Terms (what knowledge moves) live in `kd_lightning.losses`; schemes (how networks train together) in
`kd_lightning.schemes`; `kd-train` (kd_lightning.train) builds both from the Hydra configs in `conf/`.
"""

__version__ = "0.1.0"
