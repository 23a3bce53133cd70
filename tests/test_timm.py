"""timm models by name: building, weights from local files only, ViT/CNN taps, token maps, input-size checks,
a foundation-model teacher file through the config path, and a tiny ViT student that trains, resumes and runs bf16."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kd_lightning.data import DigitsDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.models import build_model
from kd_lightning.models.timm_models import vit_stage_blocks
from kd_lightning.pipeline import run
from kd_lightning.stage_build import build_model as build_from_config
from kd_lightning.stages import plan_stages
from kd_lightning.taps import FeatureTaps, declared_taps
from kd_lightning.tokens import split_tokens, tokens_to_map

TINY_VIT = {"name": "timm:vit_tiny_patch16_224", "img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2,
            "num_heads": 2}
# DINOv2's class (LayerScale, no head in the released files) at a size that runs in milliseconds.
TINY_DINOV2 = {"name": "timm:vit_small_patch14_dinov2", "img_size": 8, "patch_size": 2, "embed_dim": 48, "depth": 2,
               "num_heads": 2}


def tiny_vit(num_classes: int = 10, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(num_classes=num_classes, in_channels=1, **{**TINY_VIT, **overrides})


@pytest.fixture
def offline(monkeypatch):
    """No socket may connect: any download attempt fails the test instead of reaching the network."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------- names and options


def test_an_unknown_timm_name_is_refused_with_the_closest_names():
    with pytest.raises(ConfigError, match="Did you mean 'vit_tiny_patch16_224'"):
        build_model("timm:vit_tiny_patch16_22", num_classes=10)


def test_an_option_the_model_class_does_not_take_is_a_config_error():
    with pytest.raises(ConfigError, match="could not be built with arguments"):
        build_model("timm:resnet18", num_classes=10, embed_dim=64)


def test_constructor_options_reach_the_model_and_in_channels_becomes_in_chans():
    model = tiny_vit(drop_path_rate=0.1)
    assert model.patch_embed.proj.in_channels == 1 and model.embed_dim == 32 and len(model.blocks) == 2
    assert model.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert model.kd_spec == {**TINY_VIT, "num_classes": 10, "in_channels": 1, "drop_path_rate": 0.1}


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_saved_state_dict_loads_back_with_equal_outputs(tmp_path, suffix, offline):
    source = tiny_vit().eval()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:  # as a training script wraps it: {"state_dict": {"module.<key>": ...}}
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    torch.manual_seed(1)  # another random init, so equal outputs can only come from the file
    loaded = build_model(num_classes=10, in_channels=1, weights=str(path), **TINY_VIT).eval()
    images = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded(images), source(images))
    assert "weights" not in loaded.kd_spec and loaded.kd_weights == str(path)


def test_a_file_with_another_class_count_loads_the_backbone_and_keeps_a_fresh_head(tmp_path, caplog):
    source = tiny_vit(num_classes=1000)
    path = tmp_path / "in1k.safetensors"
    save_file(source.state_dict(), str(path))
    torch.manual_seed(1)
    fresh_head = build_model(num_classes=10, in_channels=1, **TINY_VIT).head.weight.detach().clone()
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="kd_lightning.models.timm_models"):
        loaded = build_model(num_classes=10, in_channels=1, weights=str(path), **TINY_VIT)
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert torch.equal(loaded.head.weight, fresh_head)
    (record,) = [r for r in caplog.records if "head keeps its fresh initialisation" in r.getMessage()]
    assert "head.weight" in record.getMessage()


def test_rgb_weights_are_adapted_to_one_input_channel(tmp_path):
    source = build_model(num_classes=10, in_channels=3, **TINY_VIT)
    path = tmp_path / "rgb.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = build_model(num_classes=10, in_channels=1, weights=str(path), **TINY_VIT)
    # timm's adapt_input_conv: a one-channel filter is the sum of the RGB ones.
    assert torch.allclose(loaded.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True))


def test_a_missing_weights_file_names_where_to_put_it(tmp_path):
    with pytest.raises(ConfigError, match="does not exist and kd_lightning never downloads. Put the model's"):
        build_model(num_classes=10, in_channels=1, weights=str(tmp_path / "absent.safetensors"), **TINY_VIT)


def test_a_file_of_another_architecture_is_a_config_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(build_model("timm:resnet18", num_classes=10).state_dict(), path)
    with pytest.raises(ConfigError, match="does not fit timm model"):
        build_model(num_classes=10, in_channels=1, weights=str(path), **TINY_VIT)


def hub_snapshot(cache: Path, repo: str, state_dict: dict) -> None:
    """The layout `huggingface_hub` leaves after a download: refs/main → snapshots/<commit>/model.safetensors."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file(state_dict, str(folder / "snapshots" / commit / "model.safetensors"))


def test_weights_hub_reads_the_local_hugging_face_cache_and_never_downloads(tmp_path, monkeypatch, offline):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match="not in the local Hugging Face hub cache .*huggingface-cli download "
                                          "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"):
        build_model(num_classes=10, in_channels=1, weights="hub", **TINY_VIT)
    source = tiny_vit().eval()
    hub_snapshot(tmp_path / "hub", "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", source.state_dict())
    loaded = build_model(num_classes=10, in_channels=1, weights="hub", **TINY_VIT).eval()
    images = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded(images), source(images))


# ---------------------------------------------------------------- taps and tokens


def test_tokens_to_map_puts_patch_k_at_row_k_div_w_column_k_mod_w():
    tokens = torch.randn(2, 1 + 6, 5, dtype=torch.float64)
    prefix, patches = split_tokens(tokens, 1)
    assert torch.equal(prefix, tokens[:, :1])
    expected = torch.empty(2, 5, 2, 3, dtype=torch.float64)
    for b in range(2):
        for k in range(6):
            for c in range(5):
                expected[b, c, k // 3, k % 3] = tokens[b, 1 + k, c]  # patch embeddings flatten row-major
    assert torch.equal(tokens_to_map(patches, (2, 3)), expected)


def test_vit_stages_are_evenly_spaced_blocks():
    assert vit_stage_blocks(12) == [2, 5, 8, 11]
    assert vit_stage_blocks(4) == [0, 1, 2, 3] and vit_stage_blocks(2) == [0, 1]


@pytest.mark.parametrize(("name", "prefix"), [("vit_tiny_patch16_224", 1), ("deit_tiny_distilled_patch16_224", 2),
                                              ("vit_small_patch14_reg4_dinov2", 5)])
def test_vit_token_taps_read_as_patch_maps_without_the_prefix_tokens(name, prefix):
    model = tiny_vit(name=f"timm:{name}").eval()
    assert model.kd_token_layout["num_prefix"] == prefix and model.kd_token_layout["grid"] == (4, 4)
    raw = {}
    model.blocks[1].register_forward_hook(lambda module, args, output: raw.setdefault("tokens", output))
    with FeatureTaps(model, ["stage2", "stem", "penultimate"]) as taps:
        model(torch.randn(2, 1, 8, 8))
        features = taps.features
    assert declared_taps(model).stages == ("stage1", "stage2")
    assert torch.equal(features["stage2"], tokens_to_map(raw["tokens"][:, prefix:], (4, 4)))
    assert features["stem"].shape == (2, 32, 4, 4) and features["penultimate"].shape == (2, 32)


def test_timm_cnn_stages_come_from_feature_info():
    taps = declared_taps(build_model("timm:resnet18", num_classes=10, in_channels=1))
    assert taps.stages == ("stage1", "stage2", "stage3", "stage4")
    assert taps.points["stem"] == "act1" and taps.points["stage4"] == "layer4"
    assert taps.points["penultimate"] == "fc:input"
    convnext = declared_taps(build_model("timm:convnext_atto", num_classes=10))
    assert [convnext.points[s] for s in convnext.stages] == ["stages.0", "stages.1", "stages.2", "stages.3"]


# ---------------------------------------------------------------- input size


@pytest.mark.parametrize(("options", "fix"), [
    ({"img_size": 16}, "Set student.img_size=8"),
    ({"img_size": 9, "patch_size": 3}, "Set student.patch_size=2"),
])
def test_a_vit_that_does_not_fit_the_data_is_refused_with_the_setting_to_change(make_cfg, options, fix):
    cfg = make_cfg("student=vit_digits", *(f"student.{key}={value}" for key, value in options.items()))
    with pytest.raises(ConfigError, match=fix):
        build_from_config(cfg.student, DigitsDataModule())


def test_a_teacher_vit_that_does_not_fit_names_the_teacher_node(make_cfg):
    cfg = make_cfg("teacher=vit_digits_large", "teacher.model.img_size=16")
    with pytest.raises(ConfigError, match="Set teacher.model.img_size=8"):
        run(cfg)


# ---------------------------------------------------------------- through the config path


def test_a_dinov2_teacher_file_loads_through_the_config_without_network(make_cfg, tmp_path, offline):
    source = build_model(num_classes=0, in_channels=1, **TINY_DINOV2)  # released DINOv2 files have no head
    path = tmp_path / "dinov2_tiny.safetensors"
    save_file(source.state_dict(), str(path))
    overrides = ["teacher=vit_digits_large", f"teacher.model.weights={path}", "baseline=false",
                 *(f"teacher.model.{key}={value}" for key, value in TINY_DINOV2.items())]
    cfg = make_cfg(*overrides)
    assert not plan_stages(cfg)[0].trains  # a teacher with weights is evaluated, never trained
    teacher = build_from_config(cfg.teacher.model, DigitsDataModule(), role="teacher").eval()
    images = torch.randn(2, 1, 8, 8)
    assert torch.equal(teacher.forward_features(images), source.eval().forward_features(images))
    results = run(cfg)
    assert results["stages"]["teacher"]["source"] == f"weights {path}"


def test_tiny_vit_student_distils_and_runs_bf16(make_cfg, recorded_losses):
    first_steps = {}
    for precision in ("32-true", "bf16-mixed"):
        recorded_losses.clear()
        run(make_cfg("student=vit_digits", "baseline=false", "distill=[kd,fitnet]", "scheme.ce_weight=0.1",
                     f"trainer.precision={precision}"))
        assert all(torch.isfinite(torch.tensor(recorded_losses["student"])))
        first_steps[precision] = recorded_losses["student"][0]
    assert first_steps["bf16-mixed"] != first_steps["32-true"]
    assert abs(first_steps["bf16-mixed"] - first_steps["32-true"]) <= 0.02 * abs(first_steps["32-true"])


def test_tiny_vit_student_resumes_mid_epoch_with_the_uninterrupted_losses(tmp_path, monkeypatch):
    from test_resume import RESUME_STEP, compose_cfg, run_recording

    settings = ["student=vit_digits", "distill=[kd,fitnet]", "scheme.ce_weight=0.1",
                "student.drop_path_rate=0.1"]  # stochastic depth draws random numbers: the RNG state must resume
    whole = run_recording(compose_cfg(tmp_path / "cache", tmp_path / "whole", *settings), monkeypatch)
    checkpoint = tmp_path / "whole" / "student" / "checkpoints" / f"epoch=0-step={RESUME_STEP}.ckpt"
    resumed = run_recording(compose_cfg(tmp_path / "cache", tmp_path / "resumed", *settings,
                                        f"ckpt_path='{checkpoint}'"), monkeypatch)
    assert resumed and resumed == {step: loss for step, loss in whole.items() if step > RESUME_STEP}


def test_a_file_for_another_image_size_has_its_position_embedding_resized(tmp_path):
    source = tiny_vit(img_size=16)
    path = tmp_path / "vit16.safetensors"
    save_file(source.state_dict(), str(path))
    loaded = build_model(num_classes=10, in_channels=1, weights=str(path), **TINY_VIT)
    assert loaded.pos_embed.shape == (1, 1 + 16, 32)
    assert torch.equal(loaded.pos_embed[:, :1], source.pos_embed[:, :1])  # the class token's is kept as it is


def test_a_dynamic_size_vit_maps_the_tokens_of_whatever_square_input_it_gets():
    model = tiny_vit(dynamic_img_size=True).eval()
    with FeatureTaps(model, ["stage1"]) as taps:
        model(torch.randn(2, 1, 12, 12))
        assert taps.features["stage1"].shape == (2, 32, 6, 6)


def test_a_foundation_model_teacher_reads_a_larger_view_and_is_served_from_the_teacher_cache(make_cfg, tmp_path,
                                                                                              offline,
                                                                                              recorded_losses):
    # The recipe of README "Transformers and timm models": a DINOv2-class teacher from a local file, at its own
    # (larger) input size, resized on the device from the student's 8×8 digits; its features distilled (its head
    # is fresh), its outputs cached per (sample, view).
    big = {**TINY_DINOV2, "img_size": 16, "patch_size": 4}
    source = build_model(num_classes=0, in_channels=1, **big)
    path = tmp_path / "dinov2_tiny.safetensors"
    save_file(source.state_dict(), str(path))
    overrides = ["teacher=vit_digits_large", f"teacher.model.weights={path}", "baseline=false",
                 *(f"teacher.model.{key}={value}" for key, value in big.items()),
                 "+inputs.views.big={size:16}", "inputs.teacher=big", "distill=[rkd]", "data.augment=true",
                 "trainer.max_epochs=2"]
    run(make_cfg(*overrides))
    uncached = list(recorded_losses["student"])
    recorded_losses.clear()
    # float32: a random backbone's features differ between samples by less than float16's 11 bits resolve.
    results = run(make_cfg(*overrides, "teacher_cache=memory", "teacher_cache.dtype=float32"))
    assert recorded_losses["student"] == pytest.approx(uncached, rel=1e-5, abs=1e-6)
    assert results["teacher"]["model"]["input"] == "big" and "input" not in results["student"]
    # At 8×8 the teacher would be refused: its img_size is the view's.
    with pytest.raises(ConfigError, match="img_size"):
        run(make_cfg(*[o for o in overrides if not o.startswith(("+inputs", "inputs"))]))
