"""The teacher contract: frozen, pinned to eval, no autograd, outside optimizers and checkpoints."""

from __future__ import annotations

import torch

from kd_lightning.losses.terms import KD
from kd_lightning.models import build_model
from kd_lightning.schemes import Offline
from kd_lightning.teachers import FrozenTeacher


def make_module() -> Offline:
    return Offline(student=build_model("convnet_small", 10, 1), teacher=build_model("convnet_large", 10, 1),
                   terms={"kd": KD()}, num_classes=10, example_input=torch.randn(2, 1, 8, 8),
                   optimizer=lambda params: torch.optim.SGD(params, lr=0.1))


def test_teacher_cannot_leave_eval_mode():
    module = make_module()
    module.train()
    module.teacher.train()
    assert not module.teacher.training and not any(m.training for m in module.teacher.modules())


def test_teacher_runs_without_autograd_and_has_no_trainable_parameters():
    module = make_module()
    assert not module.teacher(torch.randn(3, 1, 8, 8)).requires_grad
    assert not any(parameter.requires_grad for parameter in module.teacher.parameters())


def test_teacher_is_outside_the_optimizer_and_the_state_dict():
    module = make_module()
    teacher_ids = {id(parameter) for parameter in module.teacher.parameters()}
    optimizer = module.configure_optimizers()
    optimized = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    assert optimized and not optimized & teacher_ids
    assert not any(key.startswith("teacher") for key in module.state_dict())
    assert not teacher_ids & {id(parameter) for parameter in module.parameters()}


def test_teacher_follows_device_and_dtype_moves():
    module = make_module().to(torch.float64)
    assert next(module.teacher.parameters()).dtype == torch.float64


def test_frozen_teacher_wraps_once():
    teacher = FrozenTeacher(build_model("convnet_large", 10, 1))
    module = Offline(student=build_model("convnet_small", 10, 1), teacher=teacher, terms={}, num_classes=10,
                     example_input=torch.randn(2, 1, 8, 8), optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    assert module.teacher is teacher
