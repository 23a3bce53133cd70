"""Distillation terms. Each is an `nn.Module` named in `conf/distill/<name>.yaml` by its `_target_`."""

from kd_lightning.losses.terms.ab import AB
from kd_lightning.losses.terms.at import AT
from kd_lightning.losses.terms.base import BuildContext, DistillInputs, DistillTerm
from kd_lightning.losses.terms.cc import CC
from kd_lightning.losses.terms.consistency import Consistency
from kd_lightning.losses.terms.crd import CRD
from kd_lightning.losses.terms.dist import DIST
from kd_lightning.losses.terms.dkd import DKD
from kd_lightning.losses.terms.fitnet import FitNet
from kd_lightning.losses.terms.fsp import FSP
from kd_lightning.losses.terms.ft import FT
from kd_lightning.losses.terms.kd import KD
from kd_lightning.losses.terms.l1_logits import L1Logits
from kd_lightning.losses.terms.minilm import MiniLM
from kd_lightning.losses.terms.nst import NST
from kd_lightning.losses.terms.ofa import OFA
from kd_lightning.losses.terms.ofd import OFD
from kd_lightning.losses.terms.pkt import PKT
from kd_lightning.losses.terms.reviewkd import ReviewKD
from kd_lightning.losses.terms.rkd import RKD
from kd_lightning.losses.terms.sp import SP
from kd_lightning.losses.terms.supervision_transfer import SupervisionTransfer
from kd_lightning.losses.terms.tf_kd import TfKD
from kd_lightning.losses.terms.vid import VID
from kd_lightning.losses.terms.vitkd import ViTKD

__all__ = ["AB", "AT", "BuildContext", "CC", "CRD", "Consistency", "DIST", "DKD", "DistillInputs", "DistillTerm", "FSP", "FT",
           "FitNet", "KD", "L1Logits", "MiniLM", "NST", "OFA", "OFD", "PKT", "RKD", "ReviewKD", "SP",
           "SupervisionTransfer", "TfKD", "VID", "ViTKD"]
