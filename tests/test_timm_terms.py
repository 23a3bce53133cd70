"""Every catalogue term between a CNN and a ViT, both ways: it trains a step with a finite loss, or it is
refused with a ConfigError when the scheme is built (never a traceback in the middle of training)."""

from __future__ import annotations


import pytest
import torch

from kd_lightning.data import SyntheticDataModule
from kd_lightning.models import build_model
from scheme_cases import TERMS, TRANSFORMER_TERMS
from term_walk import trains_or_is_refused

# conf/student/vit_digits.yaml, one block fewer: the walk is about shapes, not capacity.
VIT = {"name": "timm:vit_tiny_patch16_224", "img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2,
       "num_heads": 2}
# The only refusals, with what their messages must say: FSP's Gram matrices need equal widths on both sides
# (its own rule, as between CNNs), OFD's margin needs a teacher BatchNorm before a ReLU, which a ViT has not.
REFUSED = {("fsp", "cnn_teacher_vit_student"): "equal channel counts",
           ("fsp", "vit_teacher_cnn_student"): "equal channel counts",
           ("ofd", "vit_teacher_cnn_student"): "vision-transformer teacher"}
# The transformer terms relate two networks' self-attention: a CNN on either side has none.
REFUSED.update({(term, pair): "no transformer blocks" for term in TRANSFORMER_TERMS
                for pair in ("cnn_teacher_vit_student", "vit_teacher_cnn_student")})
PAIRS = {"cnn_teacher_vit_student": ("convnet_large", VIT), "vit_teacher_cnn_student": (VIT, "convnet_small")}


def network(spec) -> torch.nn.Module:
    if isinstance(spec, str):
        return build_model(spec, num_classes=10, in_channels=1)
    return build_model(num_classes=10, in_channels=1, **spec)




@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("term_name", TERMS)
def test_term_trains_between_cnn_and_vit_or_is_refused_up_front(make_cfg, term_name, pair):
    torch.manual_seed(0)
    datamodule = SyntheticDataModule(num_classes=10, in_channels=1, image_size=8, train_size=16, val_size=8,
                                     test_size=8, batch_size=8)
    teacher_spec, student_spec = PAIRS[pair]
    trains_or_is_refused(make_cfg, term_name, REFUSED.get((term_name, pair)), lambda: network(student_spec),
                         lambda: network(teacher_spec), datamodule)
