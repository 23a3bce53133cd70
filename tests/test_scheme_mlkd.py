"""MLKD as a scheme: on a batch of named inputs its loss is `functional.mlkd_loss` of the two views plus CE on both
(the formula itself: tests/test_functional.py against the reference code), and a single-tensor batch is refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional as Fn
from kd_lightning.models import build_model
from kd_lightning.schemes import MLKD
from kd_lightning.data.inputs import RoleInputs, attach_input, pick
from kd_lightning.teacher_cache import TeacherCacheOptions
from kd_lightning.teachers import FrozenTeacher


def mlkd(student_input: str = "rgb", strong: str | None = "strong", **options) -> MLKD:
    torch.manual_seed(0)
    example = {"rgb": torch.randn(2, 1, 8, 8), "strong": torch.randn(2, 1, 8, 8)}
    return MLKD(student=attach_input(build_model("convnet_tiny", num_classes=10, in_channels=1), student_input),
                teacher=FrozenTeacher(attach_input(build_model("convnet_large", num_classes=10, in_channels=1), "rgb")),
                terms={}, num_classes=10, example_input=example, inputs=RoleInputs(strong=strong),
                optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **options)


def two_view_batch(batch: int = 8):
    g = torch.Generator().manual_seed(3)
    images = {"rgb": torch.randn(batch, 1, 8, 8, generator=g), "strong": torch.randn(batch, 1, 8, 8, generator=g)}
    return images, torch.randint(0, 10, (batch,), generator=g), torch.arange(batch)


def test_the_scheme_trains_the_reference_loss_on_the_two_named_views():
    module = mlkd()
    assert (module.ce_weight, module.kd_weight, module.temperature, module.percentile) == (0.1, 0.9, 4.0, 50.0)
    images, targets, indices = two_view_batch()
    losses = module.training_losses(images, targets, indices)
    assert sorted(losses) == ["ce", "mlkd_batch", "mlkd_class", "mlkd_instance"]
    with torch.no_grad():
        module.student.train()
        student = {name: module.student(view) for name, view in images.items()}
        teacher = {name: module.teacher(view) for name, view in images.items()}
    expected = Fn.mlkd_loss(student["rgb"], student["strong"], teacher["rgb"], teacher["strong"], 4.0, 50.0)
    for part, value in expected.items():
        torch.testing.assert_close(losses[f"mlkd_{part}"], 0.9 * value)
    ce = F.cross_entropy(student["rgb"], targets) + F.cross_entropy(student["strong"], targets)
    torch.testing.assert_close(losses["ce"], 0.1 * ce)
    assert module.loss_summary() == ("loss = 0.1·CE(weak + strong) + 0.9·mlkd(T=4.0, 3.0, 5.0, 2.0, 6.0; instance + "
                                     "class + batch, percentile 50.0)")


def test_the_weak_view_is_the_input_the_student_names():
    module = mlkd()
    images, targets, indices = two_view_batch()
    images = {"strong": images["strong"], "depth": images["rgb"] * 0, "rgb": images["rgb"]}
    assert pick(images, module.student) is images["rgb"]
    named = module.training_losses(images, targets, indices)
    reference = module.training_losses({"rgb": images["rgb"], "strong": images["strong"]}, targets, indices)
    for name in named:
        torch.testing.assert_close(named[name], reference[name])


def test_a_single_tensor_batch_is_refused():
    images, targets, indices = two_view_batch()
    with pytest.raises(ConfigError, match=r"batch of one image tensor.*inputs\.strong"):
        mlkd().training_losses(images["rgb"], targets, indices)


def test_a_missing_or_self_named_strong_view_is_refused_at_construction():
    with pytest.raises(ConfigError, match=r"inputs\.strong='hard' names no input of the batches \(they hold \['rgb', "
                                          r"'strong'\]\)"):
        mlkd(strong="hard")
    with pytest.raises(ConfigError, match=r"inputs\.strong=None names no input"):
        mlkd(strong=None)
    with pytest.raises(ConfigError, match="two views would be one"):
        mlkd(student_input="strong")


@pytest.mark.parametrize("options", [{"kd_weight": -1.0}, {"temperature": 0.0}, {"percentile": 101.0}])
def test_impossible_settings_are_refused_at_construction(options):
    with pytest.raises(ConfigError, match="scheme\\."):
        mlkd(**options)


def test_the_teacher_cache_is_refused_the_strong_views_outputs_have_no_key(tmp_path):
    with pytest.raises(ConfigError, match="cannot use the teacher cache"):
        mlkd(teacher_cache=TeacherCacheOptions("memory", tmp_path))


def test_the_scheme_config_is_the_reference_cifar_recipe_with_a_strong_view(make_cfg):
    cfg = make_cfg("scheme=mlkd")
    assert cfg.scheme._target_ == "kd_lightning.schemes.MLKD" and not cfg.get("distill")
    options = {key: value for key, value in cfg.scheme.items() if key != "_target_"}
    assert options == {"ce_weight": 0.1, "kd_weight": 0.9, "temperature": 4.0, "percentile": 50.0}
    assert cfg.inputs.strong == "strong_view" and dict(cfg.inputs.views.strong_view) == {"draw": "own", "pad": 2}


def test_the_scheme_runs_on_digits_with_its_own_defaults(make_cfg):
    from kd_lightning.pipeline import run

    results = run(make_cfg("scheme=mlkd"))
    # The student stage trained MLKD's loss on its two views (a plain Offline stage would print its own line),
    # and the strong view is the config's own input, next to the student's.
    assert results["stages"]["student"]["loss"].startswith("loss = 0.1·CE(weak + strong) + 0.9·mlkd(")
    assert "input" not in results["student"]
    assert torch.isfinite(torch.tensor(results["student_metrics"]["test/loss"]))
