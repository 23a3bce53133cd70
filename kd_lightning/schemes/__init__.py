"""Schemes: LightningModules that decide how the networks train together (DESIGN.md)."""

from kd_lightning.schemes.adversarial import Adversarial
from kd_lightning.schemes.base import DistillationModule
from kd_lightning.schemes.data_free import DataFree
from kd_lightning.schemes.data_free_methods import DAFL, DFAD, ZSKT, NoiseInputs
from kd_lightning.schemes.deit import DeiT
from kd_lightning.schemes.inversion import DeepInversion, FastDatafree
from kd_lightning.schemes.mlkd import MLKD
from kd_lightning.schemes.multi_teacher import MultiTeacher
from kd_lightning.schemes.offline import Offline
from kd_lightning.schemes.online import DML, KDCL
from kd_lightning.schemes.self_distill import BYOT, CSKD, MeanTeacher, TfKDReg
from kd_lightning.schemes.supervised import Supervised

__all__ = ["Adversarial", "BYOT", "CSKD", "DAFL", "DFAD", "DML", "DataFree", "DeepInversion", "DeiT",
           "DistillationModule", "FastDatafree", "KDCL", "MLKD", "MeanTeacher", "MultiTeacher", "NoiseInputs",
           "Offline", "Supervised", "TfKDReg", "ZSKT"]
