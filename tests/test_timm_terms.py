"""Every catalogue term between a CNN and a ViT, both ways: it trains a step with a finite loss, or it is
refused with a ConfigError when the scheme is built (never a traceback in the middle of training)."""

from __future__ import annotations


import pytest
import torch

from kd_lightning.data import SyntheticDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.models import build_model
from kd_lightning.pipeline import build_terms
from kd_lightning.schemes import Offline
from kd_lightning.teachers import FrozenTeacher
from scheme_cases import TERMS, TRANSFORMER_TERMS
from term_walk import SMALL_MEMORY, one_step, sgd

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
    terms = build_terms(make_cfg(f"distill=[{term_name}]", *SMALL_MEMORY.get(term_name, [])))
    try:
        module = Offline(student=network(student_spec), teacher=FrozenTeacher(network(teacher_spec)), terms=terms,
                         num_classes=10, example_input=datamodule.example_input(), optimizer=sgd,
                         train_size=datamodule.train_size, train_targets=datamodule.train_targets,
                         max_epochs=100)
    except ConfigError as error:
        assert (term_name, pair) in REFUSED, f"refused unexpectedly: {error}"
        assert REFUSED[term_name, pair] in str(error) and "\n" not in str(error).strip(), "one paragraph, the reason"
        return
    assert (term_name, pair) not in REFUSED, "expected a refusal at construction"
    if any(term.init_epochs for term in module.terms.values()):
        module.set_init_stage(True)
        assert torch.isfinite(one_step(module, datamodule))
        module.set_init_stage(False)
    assert torch.isfinite(one_step(module, datamodule))
