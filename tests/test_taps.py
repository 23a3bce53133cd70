"""Feature taps: hooks by name or module path, removable, and refusing features changed in place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.models import build_model
from kd_lightning.taps import FeatureTaps, declared_taps


def test_declared_and_path_taps_capture_the_latest_forward():
    model = build_model("resnet8", num_classes=10)
    with FeatureTaps(model, ["stage1", "layer2", "penultimate"]) as taps:
        model(torch.randn(2, 3, 32, 32))
        features = taps.features
    assert features["stage1"].shape == (2, 16, 32, 32)
    assert features["layer2"].shape[0] == 2
    assert features["penultimate"].shape == (2, 64)


def test_removed_taps_stop_capturing():
    model = build_model("resnet8", num_classes=10)
    taps = FeatureTaps(model, ["stage1"])
    taps.remove()
    taps.clear()
    model(torch.randn(1, 3, 32, 32))
    assert taps.features == {}


def test_generic_penultimate_for_models_without_declared_taps():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    assert declared_taps(model).points["penultimate"] == "3:input"
    with FeatureTaps(model, ["penultimate"]) as taps:
        model(torch.randn(4, 3, 2, 2))
        assert taps.features["penultimate"].shape == (4, 5)


def test_unknown_tap_lists_the_declared_ones():
    with pytest.raises(ConfigError, match=r"no tap 'stage7'.*penultimate.*stage1"):
        FeatureTaps(build_model("resnet8", num_classes=10), ["stage7"], "resnet8")


def test_feature_modified_in_place_after_capture_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(inplace=True))
    with FeatureTaps(model, ["0"]) as taps:
        model(torch.randn(1, 1, 2, 2))
        with pytest.raises(ConfigError, match="in-place"):
            taps.features
