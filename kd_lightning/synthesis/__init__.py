"""Input synthesis for data-free distillation: the objectives, the views, the in-memory pool and the
two synthesizers (DeepInversion's pixel optimisation, Fast-Datafree's meta generator)."""

from kd_lightning.synthesis.deep_inversion import DeepInversionSynthesizer
from kd_lightning.synthesis.fast_meta import FastMetaSynthesizer
from kd_lightning.synthesis.losses import BatchNormStatistics
from kd_lightning.synthesis.pool import SyntheticPool

__all__ = ["BatchNormStatistics", "DeepInversionSynthesizer", "FastMetaSynthesizer", "SyntheticPool"]
