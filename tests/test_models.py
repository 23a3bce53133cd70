"""Model zoo: every registered model builds, runs and declares taps that resolve; sizes match the papers."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.models import MODELS, build_model
from kd_lightning.taps import FeatureTaps, declared_taps

SMALL_INPUT = {name: [(1, 8), (1, 28)] for name in ("convnet_tiny", "convnet_small", "convnet_large")}
SMALL_INPUT.update({name: [(1, 8), (1, 28), (1, 32)] for name in ("lenet5", "lenet5_half")})

# Parameters at 100 classes (millions). The first eight are the CRD paper's (Tian et al., ICLR 2020);
# the rest are the figures commonly quoted for the same RepDistiller architectures in follow-up tables.
PUBLISHED_PARAMS = {
    "resnet8x4": 1.23, "resnet32x4": 7.43, "wrn_16_2": 0.70, "wrn_40_2": 2.26, "vgg8": 3.97, "vgg13": 9.46,
    "MobileNetV2": 0.81, "ShuffleNetV1": 0.95,
    "resnet20": 0.28, "resnet32": 0.47, "resnet56": 0.86, "resnet110": 1.74, "wrn_40_1": 0.57,
    "ShuffleNetV2": 1.36, "ResNet50": 23.71,
}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run_with_taps(model: nn.Module, x: torch.Tensor, name: str):
    taps = declared_taps(model)
    with torch.no_grad(), FeatureTaps(model, list(taps.points), name) as feature_taps:
        logits = model(x)
        return taps, logits, feature_taps.features


VECTOR_MODELS = sorted(name for name in MODELS if MODELS.meta(name).get("inputs") == "vectors")
IMAGE_MODELS = sorted(name for name in MODELS if name not in VECTOR_MODELS)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_zoo_model_runs_and_declares_resolving_taps(name: str) -> None:
    for channels, size in SMALL_INPUT.get(name, [(3, 32)]):
        model = build_model(name, num_classes=10, in_channels=channels).eval()
        # In-place ops would overwrite captured features (FeatureTaps refuses them when read).
        assert not any(getattr(m, "inplace", False) for m in model.modules())
        taps, logits, features = _run_with_taps(model, torch.randn(2, channels, size, size), name)

        assert logits.shape == (2, 10)
        assert taps.stages == tuple(f"stage{k}" for k in range(1, len(taps.stages) + 1)) and len(taps.stages) >= 2
        assert {"stem", "penultimate", *taps.stages} <= set(features)
        assert all(t.shape[0] == 2 for t in features.values())
        assert features["penultimate"].shape == (2, model.state_dict()[_last_linear(model) + ".weight"].shape[1])
        assert features["stem"].dim() == 4
        sizes = [features[s].shape[-1] for s in taps.stages]
        assert all(f.dim() == 4 for f in (features[s] for s in taps.stages)) and sizes == sorted(sizes, reverse=True)
        for stage in taps.stages:
            pre = features.get(f"{stage}_pre")
            if pre is None:
                continue
            assert pre.shape == features[stage].shape and (pre < 0).any()
            if taps.points[f"{stage}_pre"] != taps.points[stage]:
                assert not torch.equal(pre, features[stage])


def _last_linear(model: nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


@pytest.mark.parametrize("name", ["resnet8", "ResNet50", "vgg8", "ShuffleNetV1", "ShuffleNetV2", "wrn_16_1",
                                  "MobileNetV2", "convnet_small"])
def test_pre_relu_taps_are_repdistillers_preact_features(name: str) -> None:
    torch.manual_seed(0)
    channels = 1 if name in SMALL_INPUT else 3
    model = build_model(name, num_classes=10, in_channels=channels).eval()
    taps, _, f = _run_with_taps(model, torch.randn(2, channels, 32, 32), name)
    for k, stage in enumerate(taps.stages, start=1):
        pre, post = f[f"{stage}_pre"], f[stage]
        if name == "wrn_16_1":  # pre-activation net: the stage output after the next BN
            next_bn = [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1][k - 1]
            assert torch.allclose(pre, next_bn(post))
        elif name == "MobileNetV2":  # linear bottleneck: the stage output is already pre-activation
            assert pre is post
        elif name == "ShuffleNetV2":  # unshuffled concat before the ReLU, as RepDistiller returns it
            assert torch.equal(post, getattr(model, f"layer{k}")[-1].shuffle(torch.relu(pre)))
        else:
            assert torch.equal(post, torch.relu(pre))


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_counts_match_published(name: str) -> None:
    millions = _count(build_model(name, num_classes=100)) / 1e6
    assert millions == pytest.approx(PUBLISHED_PARAMS[name], rel=0.01)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleNetV1", "ShuffleNetV2"])
def test_cifar_models_accept_one_input_channel(name: str) -> None:
    model = build_model(name, num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_model_kwargs_reach_the_factory_and_unknown_ones_are_config_errors() -> None:
    assert build_model("convnet_small", num_classes=10, in_channels=1, width=4).fc.in_features == 8
    assert build_model("MobileNetV2", num_classes=10, width_mult=1.0).conv1[0].out_channels == 32
    with pytest.raises(ConfigError, match="could not be built.*width"):
        build_model("resnet8", num_classes=10, width=4)


def test_unknown_zoo_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"Unknown model 'resnet9'.*Did you mean.*'resnet8'.*Valid models:.*"
                                          r"ShuffleNetV2.*convnet_small.*wrn_40_2.*torchvision:"):
        build_model("resnet9", num_classes=10)


# torchvision ---------------------------------------------------------------------------------------------


@pytest.fixture
def hub_dir(tmp_path):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    yield tmp_path
    torch.hub.set_dir(previous)


def test_torchvision_resnet_builds_with_stage_taps() -> None:
    model = build_model("torchvision:resnet18", num_classes=7).eval()
    taps, logits, f = _run_with_taps(model, torch.randn(2, 3, 64, 64), "torchvision:resnet18")
    assert logits.shape == (2, 7)
    assert taps.stages == ("stage1", "stage2", "stage3", "stage4")
    assert [tuple(f[s].shape[1:]) for s in ("stem", *taps.stages)] == [
        (64, 16, 16), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    assert f["penultimate"].shape == (2, 512)


def test_other_torchvision_models_get_the_generic_penultimate() -> None:
    model = build_model("torchvision:mobilenet_v3_small", num_classes=5, in_channels=1).eval()
    assert set(declared_taps(model).points) == {"penultimate"}
    _, logits, f = _run_with_taps(model, torch.randn(2, 1, 32, 32), "mobilenet_v3_small")
    assert logits.shape == (2, 5) and f["penultimate"].shape == (2, 1024)


def test_unknown_torchvision_name_suggests_names() -> None:
    with pytest.raises(ConfigError, match=r"Unknown torchvision model 'resnet19'.*Did you mean.*'resnet18'.*"
                                          r"list_models"):
        build_model("torchvision:resnet19", num_classes=10)
    with pytest.raises(ConfigError, match="zoo model: use it without the 'torchvision:' prefix"):
        build_model("torchvision:resnet8x4", num_classes=10)


def test_missing_torchvision_weights_name_the_file_to_copy_in(hub_dir) -> None:
    expected = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(ConfigError, match=re.escape(str(expected)) + ".*set weights to null") as error:
        build_model("torchvision:resnet18", num_classes=1000, weights="IMAGENET1K_V1")
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(error.value)
    assert not expected.exists()
    with pytest.raises(ConfigError, match="1000-class head but num_classes=7"):
        build_model("torchvision:resnet18", num_classes=7, weights="IMAGENET1K_V1")
    with pytest.raises(ConfigError, match="no weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        build_model("torchvision:resnet18", num_classes=1000, weights="IMAGENET9K")


def test_local_torchvision_weights_load_and_adapt_to_one_channel(hub_dir) -> None:
    reference = build_model("torchvision:resnet18", num_classes=1000)
    (hub_dir / "checkpoints").mkdir()
    torch.save(reference.state_dict(), hub_dir / "checkpoints" / "resnet18-f37072fd.pth")

    loaded = build_model("torchvision:resnet18", num_classes=1000, weights="ResNet18_Weights.IMAGENET1K_V1")
    assert torch.equal(loaded.fc.weight, reference.fc.weight)
    gray = build_model("torchvision:resnet18", num_classes=1000, in_channels=1, weights="IMAGENET1K_V1").eval()
    assert torch.allclose(gray.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(gray(x), reference.eval()(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_the_mlp_family_is_registered_for_feature_vectors() -> None:
    assert VECTOR_MODELS == ["mlp", "mlp_large", "mlp_small"]


@pytest.mark.parametrize("name", VECTOR_MODELS)
def test_mlp_runs_on_vectors_and_declares_stage_taps(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, in_channels=47).eval()
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    taps, logits, features = _run_with_taps(model, torch.randn(4, 47), name)
    assert logits.shape == (4, 10)
    depth = model.depth
    assert taps.stages == tuple(f"stage{k}" for k in range(1, depth + 1)) and depth >= 2
    widths = [getattr(model, f"stage{k}")[0].out_features for k in range(1, depth + 1)]
    for k, width in enumerate(widths, start=1):
        pre, post = features[f"stage{k}_pre"], features[f"stage{k}"]
        assert pre.shape == post.shape == (4, width)
        assert (pre < 0).any() and torch.equal(post, torch.relu(pre))
    # Eval mode: dropout is off, so the classifier reads the last stage's output itself.
    assert torch.equal(features["penultimate"], features[f"stage{depth}"])
    assert torch.equal(model.fc(features["penultimate"]), logits)


def test_mlp_stage_is_linear_then_batch_norm_then_its_own_relu_and_dropout_follows_it() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", num_classes=3, in_channels=5, hidden=[7, 6, 4], dropout=0.5, batch_norm=True)
    assert [type(m) for m in model.stage1] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] and model.stage1[0].bias is None
    x = torch.randn(8, 5)
    model.eval()
    with torch.no_grad():
        expected = x
        for k in (1, 2, 3):
            stage = getattr(model, f"stage{k}")
            expected = torch.relu(stage[1](stage[0](expected)))  # BN in eval mode: running statistics
        assert torch.allclose(model(x), model.fc(expected))
    model.train()
    taps = declared_taps(model)
    with torch.no_grad(), FeatureTaps(model, ["stage3", "penultimate"], "mlp") as captured:
        model(x)
        stage3, penultimate = captured.features["stage3"], captured.features["penultimate"]
    # Training mode: dropout zeroes some of the last stage's outputs and scales the rest by 1 / (1 - p).
    kept = penultimate != 0
    assert (~kept & (stage3 != 0)).any() and torch.allclose(penultimate[kept], 2 * stage3[kept])
    assert taps.points["stage3_pre"] == "stage3.2:input"


def test_mlp_refuses_images_and_bad_widths_with_the_fix() -> None:
    model = build_model("mlp_small", num_classes=10, in_channels=1)
    with pytest.raises(ConfigError, match="data=mfeat"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(ConfigError, match="positive widths"):
        build_model("mlp", num_classes=10, in_channels=4, hidden=[8, 0])
    with pytest.raises(ConfigError, match="dropout"):
        build_model("mlp", num_classes=10, in_channels=4, dropout=1.0)
