"""DeiT's distillation-token scheme and the mixup/CutMix data options it trains with."""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd_lightning.data import DigitsDataModule
from kd_lightning.data.mixing import MixDraw, MixOptions, draw_mix, mix_batch, mix_generator, mix_input
from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms.base import DistillInputs
from kd_lightning.models import build_model
from kd_lightning.pipeline import run
from kd_lightning.schemes import DeiT
from kd_lightning.teachers import export_student, read_weights
from scheme_cases import DEIT_DIGITS

SGD = partial(torch.optim.SGD, lr=0.05)


def deit_student(**options):
    return build_model(**{**DEIT_DIGITS, **options}, num_classes=10, in_channels=1)


def cnn(name="convnet_tiny", num_classes=10):
    return build_model(name, num_classes=num_classes, in_channels=1)


# --- the loss, against facebookresearch/deit losses.py written out in float64 -------------------------------------

def reference_deit_loss(class_logits, distill_logits, teacher_logits, targets, kind, alpha, tau):
    """DistillationLoss.forward with SoftTargetCrossEntropy (targets: class probabilities), by plain loops."""
    c, d, t, y = (v.double() for v in (class_logits, distill_logits, teacher_logits, targets))
    batch, classes = c.shape

    def log_softmax(row):
        top = max(row.tolist())
        return [v - top - math.log(sum(math.exp(u - top) for u in row.tolist())) for v in row.tolist()]

    base = sum(-sum(y[i, k].item() * log_softmax(c[i])[k] for k in range(classes)) for i in range(batch)) / batch
    if kind == "none":
        return base
    if kind == "soft":
        total = 0.0
        for i in range(batch):
            student, teacher = log_softmax(d[i] / tau), log_softmax(t[i] / tau)
            total += sum(math.exp(teacher[k]) * (teacher[k] - student[k]) for k in range(classes))
        distill = total * tau * tau / (batch * classes)  # reduction sum, / outputs_kd.numel()
    else:
        labels = [max(range(classes), key=lambda k: t[i, k].item()) for i in range(batch)]
        distill = sum(-log_softmax(d[i])[labels[i]] for i in range(batch)) / batch
    return base * (1 - alpha) + distill * alpha


@pytest.mark.parametrize("kind,alpha,tau", [("hard", 0.5, 1.0), ("soft", 0.5, 1.0), ("soft", 0.3, 3.0),
                                            ("none", 0.5, 1.0)])
def test_loss_follows_the_reference_distillation_loss_with_soft_targets(kind, alpha, tau):
    torch.manual_seed(0)
    student = deit_student()
    module = DeiT(student, cnn("convnet_large"), {}, 10, torch.randn(2, 1, 8, 8), distillation_type=kind,
                  alpha=alpha, tau=tau, optimizer=SGD)
    images = torch.randn(6, 1, 8, 8)
    targets = torch.softmax(torch.randn(6, 10), 1)  # a mixed batch's class probabilities
    losses = module.training_losses(images, targets, None)
    student.train()
    class_logits, distill_logits = student(images)
    teacher_logits = module.teacher(images)
    expected = reference_deit_loss(class_logits.detach(), distill_logits.detach(), teacher_logits, targets, kind,
                                   alpha, tau)
    total = sum(losses.values())
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert set(losses) == ({"ce"} if kind == "none" else {"ce", f"deit_{kind}"})


def test_training_returns_both_heads_and_evaluation_their_average():
    torch.manual_seed(0)
    student = deit_student()
    module = DeiT(student, cnn(), {}, 10, torch.randn(2, 1, 8, 8), optimizer=SGD)
    images = torch.randn(4, 1, 8, 8)
    student.train()
    class_logits, distill_logits = student(images)  # no dropout in this network: train and eval forwards agree
    assert not torch.allclose(class_logits, distill_logits)
    module.eval()
    torch.testing.assert_close(module(images), (class_logits + distill_logits) / 2)
    # Validation reads the averaged heads: its loss is the CE of their mean.
    logged = {}
    module.log = lambda name, value, **kw: logged.setdefault(name, value)
    module._evaluate((images, torch.arange(4), torch.arange(4)), module.val_metrics, "val")
    averaged = (class_logits + distill_logits) / 2
    torch.testing.assert_close(logged["val/loss"], F.cross_entropy(averaged, torch.arange(4)))


def test_exported_student_holds_both_heads_and_rebuilds_to_the_averaged_output(tmp_path):
    torch.manual_seed(0)
    student = deit_student()
    DeiT(student, cnn(), {}, 10, torch.randn(2, 1, 8, 8), optimizer=SGD)
    state_dict, spec = read_weights(export_student(student, tmp_path / "student.pt"))
    assert {"head.weight", "head_dist.weight", "dist_token"} <= set(state_dict)
    rebuilt = build_model(**{k: v for k, v in spec.items() if k not in ("num_classes", "in_channels")},
                          num_classes=spec["num_classes"], in_channels=spec["in_channels"])
    rebuilt.load_state_dict(state_dict)
    images = torch.randn(3, 1, 8, 8)
    student.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(images), student(images))
    rebuilt.train()  # a rebuilt model's distilled training is off: the averaged heads in training mode too
    assert isinstance(rebuilt(images), torch.Tensor)


def test_refusals_name_the_fix():
    example = torch.randn(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="distillation token.*deit_tiny_distilled_patch16_224.*deit_digits"):
        DeiT(cnn(), cnn(), {}, 10, example, optimizer=SGD)
    with pytest.raises(ConfigError, match="teacher's 7 logits.*10 classes"):
        DeiT(deit_student(), cnn(num_classes=7), {}, 10, example, distillation_type="hard", optimizer=SGD)
    with pytest.raises(ConfigError, match="'medium'.*hard"):
        DeiT(deit_student(), cnn(), {}, 10, example, distillation_type="medium", optimizer=SGD)
    DeiT(deit_student(), cnn(num_classes=7), {}, 10, example, distillation_type="none", optimizer=SGD)


def test_scheme_config_refuses_a_cnn_student_up_front(make_cfg):
    with pytest.raises(ConfigError, match="distillation token"):
        run(make_cfg("scheme=deit"))


# --- mixup / CutMix, against timm's Mixup in batch mode --------------------------------------------------------

class NumpyDrawingFrom:
    """numpy, for timm's mixup module, whose np.random.rand/beta/randint then draw from one Generator."""

    def __init__(self, generator):
        self.generator = generator
        self.random = self

    def __getattr__(self, name):
        return getattr(np, name)

    def rand(self):
        return self.generator.random()

    def beta(self, a, b):
        return self.generator.beta(a, b)

    def randint(self, low, high, size=None):
        return self.generator.integers(low, high, size=size)


@pytest.mark.parametrize("mixup,cutmix,prob,smoothing", [(0.8, 1.0, 1.0, 0.1), (0.8, 0.0, 1.0, 0.0),
                                                         (0.0, 1.0, 1.0, 0.1), (0.8, 1.0, 0.5, 0.1)])
def test_mixing_is_timms_batch_mode(monkeypatch, mixup, cutmix, prob, smoothing):
    import timm.data.mixup as timm_mixup

    options = MixOptions(mixup, cutmix, prob, 0.5, smoothing)
    seen_cutmix = seen_mixup = 0
    for seed in range(24):
        images, targets = torch.randn(8, 3, 12, 10), torch.randint(0, 5, (8,))
        ours = mix_batch((images, targets, torch.arange(8)), options, 5, (12, 10), mix_generator(seed, 0, 0, 0))
        monkeypatch.setattr(timm_mixup, "np", NumpyDrawingFrom(mix_generator(seed, 0, 0, 0)))
        reference = timm_mixup.Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=0.5,
                                     mode="batch", label_smoothing=smoothing, num_classes=5)
        expected_images, expected_targets = reference(images.clone(), targets)
        torch.testing.assert_close(ours[0], expected_images, rtol=0, atol=0)
        torch.testing.assert_close(ours[1], expected_targets)
        changed = (ours[0] != images).any(dim=(0, 1))
        seen_cutmix += bool(changed.any() and not changed.all())
        seen_mixup += bool(changed.all())
    assert seen_cutmix or not cutmix
    assert seen_mixup or not mixup


def test_named_inputs_share_lambda_flip_and_a_scaled_box():
    draw = MixDraw(lam=1 - 4 / 64, box=(2, 4, 4, 6), size=(8, 8))
    small, large = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 16, 16)
    mixed_small, mixed_large = mix_input(small, draw), mix_input(large, draw)
    assert torch.equal(mixed_small[:, :, 2:4, 4:6], small.flip(0)[:, :, 2:4, 4:6])
    assert torch.equal(mixed_large[:, :, 4:8, 8:12], large.flip(0)[:, :, 4:8, 8:12])
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[4:8, 8:12] = False
    assert torch.equal(mixed_large[:, :, outside], large[:, :, outside])
    blend = MixDraw(lam=0.7)
    torch.testing.assert_close(mix_input(large, blend), 0.7 * large + 0.3 * large.flip(0))


def test_draws_are_a_function_of_seed_epoch_batch_and_rank():
    options = MixOptions(0.8, 1.0)
    draw = lambda *key: draw_mix(options, mix_generator(*key), (8, 8))  # noqa: E731
    assert draw(0, 1, 2, 0) == draw(0, 1, 2, 0)
    assert len({draw(0, 1, batch, 0) for batch in range(6)}) == 6
    assert draw(0, 1, 2, 0) != draw(0, 1, 2, 1) and draw(0, 1, 2, 0) != draw(0, 2, 2, 0)


def fake_trainer(training, epoch=0, ready=0, rank=0):
    progress = SimpleNamespace(current=SimpleNamespace(ready=ready))
    return SimpleNamespace(training=training, current_epoch=epoch, global_rank=rank,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def test_only_training_batches_are_mixed():
    datamodule = DigitsDataModule(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.0)
    batch = (torch.randn(6, 1, 8, 8), torch.arange(6), torch.arange(6), torch.zeros(6, dtype=torch.long))
    datamodule.trainer = fake_trainer(training=False)
    assert datamodule.on_after_batch_transfer(batch, 0) is batch
    datamodule.trainer = fake_trainer(training=True, ready=3)
    mixed = datamodule.on_after_batch_transfer(batch, 0)
    assert mixed[1].shape == (6, 10) and torch.allclose(mixed[1].sum(1), torch.ones(6))
    assert not torch.equal(mixed[0], batch[0])
    torch.testing.assert_close(datamodule.on_after_batch_transfer(batch, 0)[0], mixed[0])  # replayed exactly


def test_terms_read_the_dominant_class_of_a_mixed_target():
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.2, 0.0, 0.8]])
    inputs = DistillInputs(student_logits=torch.zeros(2, 3), targets=soft, indices=torch.arange(2))
    assert inputs.targets.tolist() == [0, 2]


@pytest.mark.parametrize("overrides,message", [
    (["scheme=cs_kd"], "scheme CSKD reads one hard label"),
    (["scheme=tf_kd_reg"], "scheme TfKDReg reads one hard label"),
    (["distill=[crd]"], r"distill=\['crd'\] keep one memory slot"),
    (["distill=[kd]", "labeled_fraction=0.5"], "hidden label would leak"),
    (["distill=[kd]", "teacher_cache=memory"], "teacher cache keys"),
    (["data.mixup_alpha=-1"], "must be ≥ 0"),
])
def test_mixing_is_refused_where_it_cannot_train(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(make_cfg("data.mixup_alpha=0.8", *overrides))
