"""The ImageNet MobileNet (V1) student: published size, the references' stage layout and checkpoint names."""

from __future__ import annotations

import pytest
import torch

from kd_lightning.models import build_model
from kd_lightning.taps import FeatureTaps, declared_taps


def test_parameter_count_is_the_published_4_23m_at_1000_classes():
    model = build_model("MobileNetV1", num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(4.23, rel=0.01)


def test_stages_at_224_are_the_references_feature_maps_and_pre_relu_taps_precede_the_relu():
    # mdistiller / ReviewKD: f1..f4 have 128, 256, 512, 1024 channels at strides 4, 8, 16, 32.
    torch.manual_seed(0)
    model = build_model("MobileNetV1", num_classes=1000).eval()
    taps = declared_taps(model)
    with torch.no_grad(), FeatureTaps(model, list(taps.points), "MobileNetV1") as feature_taps:
        logits = model(torch.randn(1, 3, 224, 224))
        features = feature_taps.features
    assert logits.shape == (1, 1000)
    assert features["stem"].shape == (1, 32, 112, 112)
    expected = [(128, 56), (256, 28), (512, 14), (1024, 7)]
    for stage, (channels, size) in zip(taps.stages, expected, strict=True):
        assert features[stage].shape == (1, channels, size, size)
        assert torch.equal(features[stage], torch.relu(features[f"{stage}_pre"]))
        assert (features[f"{stage}_pre"] < 0).any()
    assert features["penultimate"].shape == (1, 1024)


def test_state_dict_uses_the_reference_names_so_their_checkpoints_load():
    state = build_model("MobileNetV1", num_classes=1000).state_dict()
    shapes = {"model.0.0.weight": (32, 3, 3, 3), "model.1.0.weight": (32, 1, 3, 3),
              "model.1.3.weight": (64, 32, 1, 1), "model.13.3.weight": (1024, 1024, 1, 1),
              "model.13.4.running_var": (1024,), "fc.weight": (1000, 1024), "fc.bias": (1000,)}
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    # 1 stem + 13 blocks, each conv followed by a BN: 27 convs, 27 BNs (5 tensors each), fc weight + bias.
    assert len(state) == 27 + 27 * 5 + 2


def test_other_class_counts_and_input_channels_build():
    model = build_model("MobileNetV1", num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 10)
