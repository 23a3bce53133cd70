"""Supervision transfer (Gupta, Hoffman & Malik 2016): the term against float64 arithmetic written here from the
paper's f(t(I), φ(g(J))), its 1×1 adapter, its refusals, and its recipe's CE weight 0: labels do not move the
student."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms import BuildContext, DistillInputs, SupervisionTransfer
from kd_lightning.models import build_model
from kd_lightning.pipeline import build_terms
from kd_lightning.schemes import Offline
from kd_lightning.teachers import FrozenTeacher

STAGES = ("stage1", "stage2")


def built(student_shape, teacher_shape) -> SupervisionTransfer:
    term = SupervisionTransfer()
    term.expand_taps(STAGES, STAGES)
    term.build(BuildContext(student_shapes={"stage2": torch.Size(student_shape)},
                            teacher_shapes={"stage2": torch.Size(teacher_shape)}))
    return term


def features_inputs(student_shape, teacher_shape, seed=0) -> DistillInputs:
    g = torch.Generator().manual_seed(seed)
    return DistillInputs(student_logits=torch.zeros(student_shape[0], 10),
                         targets=torch.zeros(student_shape[0], dtype=torch.long), indices=None,
                         student_features={"stage2": torch.randn(*student_shape, generator=g)},
                         teacher_features={"stage2": torch.randn(*teacher_shape, generator=g)})


def test_the_default_taps_are_the_deepest_stages_the_papers_pool5():
    term = SupervisionTransfer()
    term.expand_taps(STAGES, ("stage1", "stage2", "stage3"))
    assert (term.student_taps, term.teacher_taps) == (["stage2"], ["stage3"])


@pytest.mark.parametrize("student_shape, teacher_shape", [((3, 4, 5, 5), (3, 8, 5, 5)), ((4, 6), (4, 9))])
def test_loss_matches_the_papers_l2_through_a_linear_width_map(student_shape, teacher_shape):
    term = built(student_shape, teacher_shape)
    inputs = features_inputs(student_shape, teacher_shape)
    weight = term.transform.weight.detach().double().numpy().reshape(teacher_shape[1], student_shape[1])
    bias = term.transform.bias.detach().double().numpy()
    student = inputs.student_features["stage2"].double().numpy()
    teacher = inputs.teacher_features["stage2"].double().numpy()
    # φ(g) = W·g + b at every position: a 1×1 convolution, or a linear layer for vectors.
    transformed = np.einsum("dc,bc...->bd...", weight, student) + bias.reshape(-1, *[1] * (student.ndim - 2))
    expected = ((transformed - teacher) ** 2).sum() / transformed.size
    torch.testing.assert_close(term.loss(inputs).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5,
                               atol=1e-7)
    assert term.sample_losses(inputs).mean().item() == pytest.approx(expected, rel=1e-5)


def test_equal_shapes_need_no_transform():
    term = built((2, 8, 4, 4), (2, 8, 4, 4))
    assert isinstance(term.transform, nn.Identity) and not list(term.parameters())
    inputs = features_inputs((2, 8, 4, 4), (2, 8, 4, 4))
    expected = (inputs.student_features["stage2"] - inputs.teacher_features["stage2"]).double().pow(2).mean()
    torch.testing.assert_close(term.loss(inputs).double(), expected)


@pytest.mark.parametrize("student_shape, teacher_shape", [((2, 4, 8, 8), (2, 6, 4, 4)), ((2, 4, 2, 2), (2, 6, 4, 4))])
def test_maps_at_another_stride_are_pooled_or_upsampled_on_the_student_side_only(student_shape, teacher_shape):
    term = built(student_shape, teacher_shape)
    conv = next(module for module in term.transform.modules() if isinstance(module, nn.Conv2d))
    inputs = features_inputs(student_shape, teacher_shape)
    student = inputs.student_features["stage2"].double()
    factor = student_shape[2] / teacher_shape[2]
    # Average over factor×factor blocks (pool), or repeat every position (nearest upsampling), then W·g + b.
    resized = (student.reshape(2, 4, 4, 2, 4, 2).mean(dim=(3, 5)) if factor > 1
               else student.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    transformed = (torch.einsum("dc,bchw->bdhw", conv.weight.detach().double()[:, :, 0, 0], resized)
                   + conv.bias.detach().double().reshape(1, -1, 1, 1))
    expected = (transformed - inputs.teacher_features["stage2"].double()).pow(2).mean()
    torch.testing.assert_close(term.loss(inputs).double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("teacher_shape", [(2, 8, 3, 3), (2, 8, 8, 4)])
def test_taps_of_unrelated_resolutions_are_refused_with_the_fix(teacher_shape):
    with pytest.raises(ConfigError, match=r"integer factor.*student_tap="):
        built((2, 4, 4, 4), teacher_shape)


@pytest.mark.parametrize("student_shape, teacher_shape", [((2, 4, 4, 4), (2, 8)), ((2, 6), (2, 3, 2, 2))])
def test_a_map_and_a_vector_are_related_by_one_linear_map(student_shape, teacher_shape):
    # Another kind of network on another modality (a CNN on images, an MLP on features): W·flatten(g) + b.
    term = built(student_shape, teacher_shape)
    linear = next(module for module in term.transform.modules() if isinstance(module, nn.Linear))
    inputs = features_inputs(student_shape, teacher_shape)
    flat = inputs.student_features["stage2"].double().flatten(1)
    transformed = flat @ linear.weight.detach().double().T + linear.bias.detach().double()
    expected = (transformed - inputs.teacher_features["stage2"].double().flatten(1)).pow(2).mean()
    torch.testing.assert_close(term.loss(inputs).double(), expected, rtol=1e-5, atol=1e-7)


def offline_supervision_transfer(make_cfg, *overrides: str) -> Offline:
    torch.manual_seed(0)
    cfg = make_cfg("distill=[supervision_transfer]", *overrides)
    return Offline(student=build_model("convnet_tiny", num_classes=10, in_channels=1),
                   teacher=FrozenTeacher(build_model("convnet_large", num_classes=10, in_channels=1)),
                   terms=build_terms(cfg), num_classes=10, example_input=torch.randn(2, 1, 8, 8),
                   ce_weight=cfg.scheme.ce_weight, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))


def student_gradients(module: Offline, images, targets) -> list[torch.Tensor]:
    module.zero_grad()
    losses = module.training_losses(images, targets, torch.arange(len(targets)))
    torch.stack(list(losses.values())).sum().backward()
    return [p.grad.clone() for p in module.student.parameters()]


def test_the_recipe_trains_without_labels_shuffled_targets_give_the_same_update(make_cfg):
    module = offline_supervision_transfer(make_cfg)
    assert module.ce_weight == 0.0
    assert module.loss_summary() == "loss = 0.0·CE (labels unused) + 1.0·supervision_transfer"
    assert isinstance(module.terms["supervision_transfer"].transform, nn.Conv2d)  # widths 8 → 64
    g = torch.Generator().manual_seed(1)
    images, targets = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)
    shuffled = targets[torch.randperm(6, generator=g)]
    assert not torch.equal(targets, shuffled)
    for unlabelled, labelled in zip(student_gradients(module, images, targets),
                                    student_gradients(module, images, shuffled)):
        assert torch.equal(unlabelled, labelled)
    # The check can see labels: with a CE weight the same shuffle changes the update.
    module = offline_supervision_transfer(make_cfg, "scheme.ce_weight=1.0")
    changed = [not torch.equal(a, b) for a, b in zip(student_gradients(module, images, targets),
                                                      student_gradients(module, images, shuffled))]
    assert any(changed)
