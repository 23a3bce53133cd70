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


def test_offline_releases_tapped_features_after_each_step_and_evaluation_batch():
    import gc
    import weakref

    import lightning as L

    from kd_lightning.data import SyntheticDataModule
    from kd_lightning.losses.terms import CRD
    from kd_lightning.schemes import Offline

    datamodule = SyntheticDataModule(num_classes=10, in_channels=1, image_size=8, train_size=32, val_size=16,
                                     test_size=8, batch_size=8)
    student, teacher = build_model("convnet_tiny", 10, 1), build_model("convnet_large", 10, 1)
    module = Offline(student=student, teacher=teacher, terms={"crd": CRD(nce_k=8)}, num_classes=10,
                     example_input=datamodule.example_input(), train_size=32, train_targets=datamodule.train_targets,
                     optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    captured: list[weakref.ref] = []
    for network in (student, teacher):  # the penultimate tap is the input of the classifier
        network.fc.register_forward_hook(lambda m, inputs, output: captured.append(weakref.ref(inputs[0])))

    class AliveAfterUse(L.Callback):
        def __init__(self) -> None:
            self.alive: list[int] = []

        def _count(self) -> None:
            gc.collect()
            self.alive.append(sum(ref() is not None for ref in captured))

        def on_after_backward(self, *args) -> None:  # the graph has let go: nothing else may hold them
            self._count()

        def on_validation_batch_start(self, *args) -> None:
            self._count()

    probe = AliveAfterUse()
    trainer = L.Trainer(max_steps=3, val_check_interval=2, limit_val_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[probe])
    trainer.fit(module, datamodule=datamodule)
    assert len(probe.alive) == 3 + 2 and probe.alive == [0] * 5
