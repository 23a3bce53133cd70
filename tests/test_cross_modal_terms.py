"""Every catalogue term between networks on different modalities: a CNN on an image and an MLP on a paired
feature vector (synthetic data with `paired_features`), in both directions. A term either trains a step with a
finite loss or is refused at construction in one paragraph that names the terms (or taps) that relate a map to a
vector."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.data import SyntheticDataModule
from kd_lightning.data.inputs import attach_input
from kd_lightning.models import build_model
from scheme_cases import TERMS, TRANSFORMER_TERMS
from term_walk import trains_or_is_refused

PAIRS = {"image_teacher_features_student": (("convnet_large", "image"), ("mlp_small", "features")),
         "features_teacher_image_student": (("mlp_large", "features"), ("convnet_small", "image"))}
# What a refusal must name: the way to relate a map to a vector.
MAP_AND_VECTOR = "a map and a vector"
REFUSED = {(term, pair): MAP_AND_VECTOR for term in ("at", "nst", "ab", "ft", "ofd", "vid") for pair in PAIRS}
# FSP's Gram matrices pair the stem with each stage: an MLP has no stem map.
REFUSED.update({("fsp", pair): "has no tap 'stem'" for pair in PAIRS})
REFUSED.update({("fitnet", pair): "penultimate" for pair in PAIRS})
REFUSED.update({(term, pair): "vision transformer" for term in TRANSFORMER_TERMS for pair in PAIRS})




@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("term_name", TERMS)
def test_term_trains_across_modalities_or_is_refused_up_front(make_cfg, term_name, pair):
    torch.manual_seed(0)
    datamodule = SyntheticDataModule(num_classes=10, in_channels=1, image_size=8, train_size=16, val_size=8,
                                     test_size=8, batch_size=8, paired_features=32)
    datamodule.use_inputs()
    (teacher_name, teacher_input), (student_name, student_input) = PAIRS[pair]

    def network(name: str, source: str) -> torch.nn.Module:
        return attach_input(build_model(name, num_classes=10, in_channels=datamodule.input_shape_of(source)[0]),
                            source)

    trains_or_is_refused(make_cfg, term_name, REFUSED.get((term_name, pair)), lambda: network(student_name, student_input),
                         lambda: network(teacher_name, teacher_input), datamodule)
