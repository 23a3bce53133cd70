"""Feature-map terms (FT, AB, FSP, VID, OFD, ReviewKD): each loss against float64 reference arithmetic written
here from the papers / reference code, OFD's margins and BatchNorm lookup, the initialisation stages run by
Lightning, and the errors users get."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.data import SyntheticDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms import AB, FSP, FT, OFD, VID, BuildContext, DistillInputs, FitNet, ReviewKD
from kd_lightning.losses.terms.ab import connector
from kd_lightning.losses.terms.ofd import batchnorm_before
from kd_lightning.losses.terms.base import _expand as expand_stage_aliases
from kd_lightning.models import build_model
from kd_lightning.schemes import Offline
from kd_lightning.taps import FeatureTaps, Taps, declared_taps
from kd_lightning.teachers import FrozenTeacher

BATCH = 4
THREE = ("stage1", "stage2", "stage3")


def built(term, student_shapes: dict, teacher_shapes: dict, teacher: nn.Module | None = None):
    term.expand_taps(THREE, THREE)
    context = BuildContext(student_shapes={k: torch.Size(v) for k, v in student_shapes.items()},
                           teacher_shapes={k: torch.Size(v) for k, v in teacher_shapes.items()}, teacher=teacher)
    term.build(context)
    term.check("term", context)
    return term.eval()  # adapters' BN on running statistics, so the reference sees the same outputs


def inputs_for(student_shapes: dict, teacher_shapes: dict, seed: int = 0) -> DistillInputs:
    gen = torch.Generator().manual_seed(seed)
    return DistillInputs(
        student_logits=torch.zeros(BATCH, 10), targets=torch.zeros(BATCH, dtype=torch.long),
        indices=torch.arange(BATCH),
        student_features={k: torch.randn(v, generator=gen) for k, v in student_shapes.items()},
        teacher_features={k: torch.randn(v, generator=gen) for k, v in teacher_shapes.items()},
    )


def avg_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean(dim=(3, 5))


def pre_shapes(channels, sizes) -> dict:
    return {f"stage{k}_pre": (BATCH, c, s, s) for k, (c, s) in enumerate(zip(channels, sizes), start=1)}


def stage_shapes(channels, sizes) -> dict:
    return {f"stage{k}": (BATCH, c, s, s) for k, (c, s) in enumerate(zip(channels, sizes), start=1)}


# ---------------------------------------------------------------- AB


def ab_reference(student: torch.Tensor, teacher: torch.Tensor, margin: float) -> torch.Tensor:
    s, t = student.double(), teacher.double()
    below = torch.where((t <= 0) & (s > -margin), (s + margin) ** 2, torch.zeros_like(s))
    above = torch.where((t > 0) & (s <= margin), (s - margin) ** 2, torch.zeros_like(s))
    return (below + above).sum()


def test_ab_boundary_loss_by_hand():
    from kd_lightning.losses import functional

    student = torch.tensor([0.5, -2.0, 0.5, 3.0, -0.5]).view(1, 5, 1, 1)
    teacher = torch.tensor([-1.0, -1.0, 2.0, 2.0, 0.0]).view(1, 5, 1, 1)
    # (0.5+1)² for the first (teacher off, student above −1), (0.5−1)² for the third, (−0.5+1)² for the last.
    assert functional.activation_boundary(student, teacher, 1.0).item() == pytest.approx(2.25 + 0.25 + 0.25)


@pytest.mark.parametrize("student_channels,teacher_channels", [((8, 16, 32), (8, 16, 32)), ((8, 16, 32), (12, 24, 48))])
def test_ab_init_loss_matches_reference(student_channels, teacher_channels):
    sizes = (8, 4, 2)
    s_shapes, t_shapes = pre_shapes(student_channels, sizes), pre_shapes(teacher_channels, sizes)
    term = built(AB(), s_shapes, t_shapes)
    assert all(isinstance(c, nn.Identity) for c in term.connectors) == (student_channels == teacher_channels)
    inputs = inputs_for(s_shapes, t_shapes)
    with torch.no_grad():
        connected = [c(inputs.student_features[f"stage{k}_pre"]) for k, c in enumerate(term.connectors, start=1)]
        got = term.init_loss(inputs)
    stage_weights = [0.25, 0.5, 1.0]  # RepDistiller: 2^(i−n+1), shallowest first
    expected = sum(w * ab_reference(s, inputs.teacher_features[f"stage{k}_pre"], 1.0)
                   for k, (w, s) in enumerate(zip(stage_weights, connected), start=1)) / BATCH * 3 / 1000
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert term.loss(inputs).item() == 0.0  # RepDistiller's main stage: no AB loss


# ---------------------------------------------------------------- FSP


def fsp_reference(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    bottom, top = bottom.double(), top.double()
    if bottom.shape[-1] > top.shape[-1]:
        bottom = avg_pool(bottom, top.shape[-1])
    n, c_top, c_bottom = bottom.shape[0], top.shape[1], bottom.shape[1]
    out = torch.empty(n, c_top, c_bottom, dtype=torch.float64)
    for i in range(c_top):
        for j in range(c_bottom):
            out[:, i, j] = (top[:, i] * bottom[:, j]).mean(dim=(1, 2))
    return out


@pytest.mark.parametrize("channels,sizes", [((3, 4, 6, 8), (8, 8, 4, 2)), ((2, 5, 3, 4), (6, 6, 3, 3))])
def test_fsp_init_loss_matches_reference(channels, sizes):
    shapes = {"stem": (BATCH, channels[0], sizes[0], sizes[0]), **stage_shapes(channels[1:], sizes[1:])}
    term = built(FSP(), shapes, shapes)
    inputs = inputs_for(shapes, shapes, seed=1)
    taps = ["stem", *THREE]
    s = [inputs.student_features[t] for t in taps]
    t = [inputs.teacher_features[t] for t in taps]
    expected = sum(((fsp_reference(s[i], s[i + 1]) - fsp_reference(t[i], t[i + 1])) ** 2).mean() for i in range(3))
    assert term.init_loss(inputs).item() == pytest.approx(expected.item(), rel=1e-5)
    assert term.loss(inputs).item() == 0.0


# ---------------------------------------------------------------- VID


@pytest.mark.parametrize("s_sizes,t_sizes", [((8, 4, 2), (8, 4, 2)), ((8, 4, 2), (4, 2, 1))])
def test_vid_loss_matches_reference(s_sizes, t_sizes):
    s_shapes, t_shapes = stage_shapes((4, 8, 16), s_sizes), stage_shapes((6, 12, 24), t_sizes)
    term = built(VID(), s_shapes, t_shapes)
    for log_scale in term.log_scales:  # the initial variance is init_pred_var, then perturb it
        torch.testing.assert_close((F.softplus(log_scale) + 1e-5).detach(), torch.full_like(log_scale, 5.0))
        log_scale.data += torch.randn_like(log_scale)
    inputs = inputs_for(s_shapes, t_shapes, seed=2)
    expected = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for regressor, log_scale, tap in zip(term.regressors, term.log_scales, THREE):
            student, teacher = inputs.student_features[tap], inputs.teacher_features[tap].double()
            if student.shape[-1] > teacher.shape[-1]:
                student = avg_pool(student, teacher.shape[-1])
            mean = regressor(student).double()
            variance = (torch.log(1 + torch.exp(log_scale.double())) + 1e-5).view(1, -1, 1, 1)
            expected += (0.5 * ((mean - teacher) ** 2 / variance + torch.log(variance))).mean()
        got = term.loss(inputs)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- FT


def normalized_rows(x: torch.Tensor) -> torch.Tensor:
    flat = x.double().reshape(x.shape[0], -1)
    return flat / flat.pow(2).sum(dim=1, keepdim=True).sqrt()


def spatial_factor(x: torch.Tensor) -> torch.Tensor:
    """RepDistiller's FactorTransfer.factor before normalisation: mean over channels of x², per position."""
    x = x.double()
    return sum(x[:, c] ** 2 for c in range(x.shape[1])) / x.shape[1]


@pytest.mark.parametrize("factor", ["repdistiller", "paper"])
@pytest.mark.parametrize("s_size,t_size", [(4, 4), (8, 4)])
def test_ft_losses_match_reference(s_size, t_size, factor):
    s_shapes, t_shapes = {"stage3": (BATCH, 6, s_size, s_size)}, {"stage3": (BATCH, 10, t_size, t_size)}
    term = built(FT(factor=factor), s_shapes, t_shapes)
    assert term.paraphraser_encoder[-2].out_channels == 5  # k = 0.5 of the teacher's 10 channels
    inputs = inputs_for(s_shapes, t_shapes, seed=3)
    teacher = inputs.teacher_features["stage3"]
    with torch.no_grad():
        student_factor = term.translator(inputs.student_features["stage3"]).double()
        teacher_factor = term.paraphraser_encoder(teacher).double()
        reconstruction = term.paraphraser_decoder(term.paraphraser_encoder(teacher)).double()
        got_main, got_init = term.loss(inputs), term.init_loss(inputs)
    if s_size > t_size:
        student_factor = avg_pool(student_factor, t_size)
    if factor == "repdistiller":
        student_factor, teacher_factor = spatial_factor(student_factor), spatial_factor(teacher_factor)
    expected_main = (normalized_rows(student_factor) - normalized_rows(teacher_factor)).abs().mean()
    expected_init = ((reconstruction - teacher.double()) ** 2).mean()
    assert got_main.item() == pytest.approx(expected_main.item(), rel=1e-5)
    assert got_init.item() == pytest.approx(expected_init.item(), rel=1e-5)


# ---------------------------------------------------------------- OFD


def margin_reference(gamma: float, beta: float) -> float:
    s, m = abs(gamma), beta
    negative_mass = 0.5 * (1 + math.erf(-m / s / math.sqrt(2)))
    if negative_mass <= 0.001:
        return -3 * s
    return m - s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / negative_mass


def test_ofd_margin_is_the_mean_of_the_negative_part():
    from kd_lightning.losses import functional

    gamma = torch.tensor([1.0, 0.5, 2.0, -1.5, 0.3])
    beta = torch.tensor([0.0, 0.3, -1.0, 0.2, -0.1])
    margins = functional.ofd_margin(gamma, beta)
    gen = torch.Generator().manual_seed(0)
    for channel, (g, b) in enumerate(zip(gamma.tolist(), beta.tolist())):
        samples = b + abs(g) * torch.randn(1_000_000, generator=gen, dtype=torch.float64)
        assert margins[channel].item() == pytest.approx(samples[samples < 0].mean().item(), abs=0.01)
        assert margins[channel].item() == pytest.approx(margin_reference(g, b), rel=1e-6)
    # A channel that is almost never negative (Φ(−β/γ) ≤ 0.001) gets −3|γ|, as the authors' code.
    assert functional.ofd_margin(torch.tensor([0.1]), torch.tensor([1.0])).item() == pytest.approx(-0.3)


@pytest.mark.parametrize("name,expected", [
    ("resnet20", ["layer1.2.bn2", "layer2.2.bn2", "layer3.2.bn2"]),
    ("resnet8", ["layer1.0.bn2", "layer2.0.bn2", "layer3.0.bn2"]),  # not the projection shortcut's BN
    ("wrn_16_1", ["block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"]),
    ("vgg8", ["block1.1", "block2.1", "block3.1", "block4.1"]),
])
def test_ofd_finds_the_batchnorm_before_each_pre_relu_tap(name, expected):
    model = build_model(name, num_classes=10).eval()
    taps = [f"{stage}_pre" for stage in declared_taps(model).stages]
    with FeatureTaps(model, taps) as recorder, torch.no_grad():
        model(torch.zeros(2, 3, 32, 32))
        shapes = {tap: feature.shape for tap, feature in recorder.features.items()}
    assert [found[0] for found in batchnorm_before(model, taps, shapes).values()] == expected


def test_ofd_loss_matches_reference_and_uses_the_teacher_margins():
    teacher = build_model("resnet8", num_classes=10).eval()
    gen = torch.Generator().manual_seed(4)
    for module in teacher.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data = torch.rand(module.num_features, generator=gen) + 0.2
            module.bias.data = torch.randn(module.num_features, generator=gen)
    t_shapes = pre_shapes((16, 32, 64), (32, 16, 8))
    s_shapes = pre_shapes((8, 16, 32), (32, 16, 4))  # the last pair differs in resolution: the teacher is pooled
    term = built(OFD(), s_shapes, t_shapes, teacher=teacher)
    inputs = inputs_for(s_shapes, t_shapes, seed=5)
    expected = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for i, (connect, k) in enumerate(zip(term.connectors, (1, 2, 3))):
            bn = teacher.get_submodule(f"layer{k}.0.bn2")
            margin = torch.tensor([margin_reference(g, b) for g, b in zip(bn.weight.tolist(), bn.bias.tolist())],
                                  dtype=torch.float64)
            torch.testing.assert_close(getattr(term, f"margin{i}").double(), margin, rtol=1e-5, atol=1e-6)
            student = connect(inputs.student_features[f"stage{k}_pre"]).double()
            teacher_feature = inputs.teacher_features[f"stage{k}_pre"].double()
            if teacher_feature.shape[-1] > student.shape[-1]:
                teacher_feature = avg_pool(teacher_feature, student.shape[-1])
            clamped = torch.maximum(teacher_feature, margin.view(1, -1, 1, 1))
            mask = (student > clamped) | (clamped > 0)
            expected += ((student - clamped) ** 2 * mask).sum() / 2 ** (2 - i)
        got = term.loss(inputs)
    assert got.item() == pytest.approx((expected / BATCH).item(), rel=1e-5)


# ---------------------------------------------------------------- ReviewKD


def hcl_reference(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s, t = student.double(), teacher.double()
    size = s.shape[-1]
    terms = [((s - t) ** 2).mean()]
    weights = [1.0]
    for level in (4, 2, 1):
        if level < size:
            weights.append(weights[-1] / 2)
            terms.append(((avg_pool(s, level) - avg_pool(t, level)) ** 2).mean())
    return sum(w * x for w, x in zip(weights, terms)) / sum(weights)


def conv_bn_reference(sequence: nn.Sequential, x: torch.Tensor, padding: int) -> torch.Tensor:
    conv, bn = sequence
    y = F.conv2d(x, conv.weight.double(), padding=padding)
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() - bn.running_mean.double() * scale
    return y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


def upsample_nearest(x: torch.Tensor, size: int) -> torch.Tensor:
    factor = size // x.shape[-1]
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


@pytest.mark.parametrize("s_sizes,t_sizes", [((8, 4, 2), (8, 4, 2)), ((8, 4, 2), (16, 8, 4))])
def test_reviewkd_fusion_and_hcl_match_reference(s_sizes, t_sizes):
    s_shapes = {**stage_shapes((4, 8, 16), s_sizes), "penultimate": (BATCH, 16)}
    t_shapes = {**pre_shapes((6, 12, 24), t_sizes), "penultimate": (BATCH, 24)}
    term = built(ReviewKD(), s_shapes, t_shapes)
    for fusion in term.fusions:  # non-trivial BN statistics
        for bn in (fusion.reduce[1], fusion.project[1]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    inputs = inputs_for(s_shapes, t_shapes, seed=6)
    student = [inputs.student_features[t].double() for t in THREE] + [inputs.student_features["penultimate"].double()]
    teacher = [inputs.teacher_features[f"{t}_pre"].double() for t in THREE]
    teacher.append(inputs.teacher_features["penultimate"].double().view(BATCH, 24, 1, 1))
    student[3] = student[3].view(BATCH, 16, 1, 1)
    assert term.fusions[3].attention is None and all(f.attention is not None for f in term.fusions[:3])
    expected = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        residual = None
        for level in (3, 2, 1, 0):  # deepest (the embedding) first
            fusion = term.fusions[level]
            x = conv_bn_reference(fusion.reduce, student[level], padding=0)
            if fusion.attention is not None:
                residual = upsample_nearest(residual, x.shape[-1])
                conv = fusion.attention[0]
                z = torch.sigmoid(F.conv2d(torch.cat([x, residual], 1), conv.weight.double(), conv.bias.double()))
                x = x * z[:, 0:1] + residual * z[:, 1:2]
            if x.shape[-1] != teacher[level].shape[-1]:
                x = upsample_nearest(x, teacher[level].shape[-1])
            residual = x
            expected += hcl_reference(conv_bn_reference(fusion.project, x, padding=1), teacher[level])
        got = term.loss(inputs)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- FitNet regressor against RepDistiller's ConvReg


@pytest.mark.parametrize(("teacher", "student", "channels", "size"), [
    ("resnet32x4", "resnet8x4", 128, 16),  # hint layer 2 of both: 128 channels at 16×16
    ("wrn_40_2", "wrn_16_2", 64, 16),  # hint layer 2 of both: 32·2 channels at 16×16
])
def test_fitnet_regressor_matches_convreg_for_equal_resolution_hints(teacher, student, channels, size):
    module = Offline(student=build_model(student, num_classes=100, in_channels=3),
                     teacher=FrozenTeacher(build_model(teacher, num_classes=100, in_channels=3)),
                     terms={"fitnet": FitNet()}, num_classes=100, example_input=torch.randn(2, 3, 32, 32),
                     optimizer=torch.optim.SGD)
    regressor = module.terms["fitnet"].regressor
    conv = regressor[0]
    # ConvReg: kernel (1 + s_H − t_H, 1 + s_W − t_W) = 1×1 with a bias, then BN (weight, bias) and ReLU.
    convreg_parameters = channels * channels * 1 * 1 + channels + 2 * channels
    assert conv.kernel_size == (1, 1)
    assert sum(p.numel() for p in regressor.parameters()) == convreg_parameters
    assert regressor(torch.randn(2, channels, size, size)).shape == (2, channels, size, size)


def test_fitnet_regressor_kernel_spans_a_small_resolution_gap_as_convreg():
    term = built(FitNet(), {"stage2": (BATCH, 8, 8, 8)}, {"stage2": (BATCH, 16, 6, 6)})
    assert term.regressor[0].kernel_size == (3, 3) and term.regressor[0].padding == (0, 0)
    assert term.regressor(torch.randn(2, 8, 8, 8)).shape == (2, 16, 6, 6)


# ---------------------------------------------------------------- initialisation stages with Lightning


def small_pair(student: str, teacher: str, term):
    torch.manual_seed(0)
    datamodule = SyntheticDataModule(num_classes=10, in_channels=1, image_size=8, train_size=16, val_size=8,
                                     test_size=8, batch_size=8)
    module = Offline(student=build_model(student, num_classes=10, in_channels=1),
                     teacher=FrozenTeacher(build_model(teacher, num_classes=10, in_channels=1)), terms={"t": term},
                     num_classes=10, example_input=datamodule.example_input(),
                     optimizer=lambda params, lr=0.1: torch.optim.SGD(params, lr=lr, momentum=0.9))
    return module, datamodule


def fit(module, datamodule, steps: int = 2) -> None:
    L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              num_sanity_val_steps=0).fit(module, datamodule=datamodule)


def ids(parameters) -> set[int]:
    return {id(p) for p in parameters}


@pytest.mark.parametrize("name", ["ft", "ab", "fsp"])
def test_init_stage_trains_exactly_the_init_parameters(name):
    term = {"ft": FT(), "ab": AB(), "fsp": FSP()}[name]
    teacher = "convnet_small" if name == "fsp" else "convnet_large"  # FSP needs equal widths; AB gets connectors
    module, datamodule = small_pair("convnet_small", teacher, term)
    student = module.student
    features = [p for n, p in student.named_parameters() if not n.startswith("fc.")]
    if name == "ft":
        expected = ids(term.paraphraser_encoder.parameters()) | ids(term.paraphraser_decoder.parameters())
    else:
        expected = ids(features) | (ids(term.connectors.parameters()) if name == "ab" else set())
    module.set_init_stage(True)
    assert ids(module.trainable_parameters()) == expected
    if name == "ab":
        assert len(list(term.connectors.parameters())) > 0
    everything = {id(p): p for p in [*student.parameters(), *term.parameters()]}
    before = {key: p.detach().clone() for key, p in everything.items()}
    fit(module, datamodule)
    moved = {key for key, p in everything.items() if not torch.equal(before[key], p.detach())}
    assert moved == expected
    # The main stage leaves what only the init stage trains out of gradients (and so out of DDP's wait).
    module.set_init_stage(False)
    assert all(m.training for m in student.modules()), "the main stage must train the student in train mode"
    assert not ids(module.trainable_parameters()) & ids(term.init_only_parameters())
    assert ids(student.parameters()) <= ids(module.trainable_parameters())


def test_init_stage_runs_at_init_lr_and_the_main_stage_at_the_optimizer_lr():
    module, _ = small_pair("convnet_small", "convnet_large", FT(init_lr=0.02))
    module.set_init_stage(True)
    assert [group["lr"] for group in module.configure_optimizers().param_groups] == [0.02]
    module.set_init_stage(False)
    assert module.configure_optimizers().param_groups[0]["lr"] == 0.1


def test_init_learning_rates_follow_repdistiller_per_term():
    # helper/pretrain.py: lr 0.01 only for FT ('factor'), AB and FSP initialise at the main learning rate.
    assert (FT().init_lr, AB().init_lr, FSP().init_lr) == (0.01, None, None)
    module, _ = small_pair("convnet_small", "convnet_large", AB())
    module.set_init_stage(True)
    assert [group["lr"] for group in module.configure_optimizers().param_groups] == [0.1]


def test_two_init_terms_get_one_optimizer_with_a_group_per_learning_rate():
    ft, ab = FT(init_lr=0.01), AB()
    torch.manual_seed(0)
    datamodule = SyntheticDataModule(num_classes=10, in_channels=1, image_size=8, train_size=16, val_size=8,
                                     test_size=8, batch_size=8)
    module = Offline(student=build_model("convnet_small", num_classes=10, in_channels=1),
                     teacher=FrozenTeacher(build_model("convnet_large", num_classes=10, in_channels=1)),
                     terms={"ft": ft, "ab": ab}, num_classes=10, example_input=datamodule.example_input(),
                     optimizer=lambda params, lr=0.1: torch.optim.SGD(params, lr=lr, momentum=0.9))
    module.set_init_stage(True)
    groups = {group["lr"]: ids(group["params"]) for group in module.configure_optimizers().param_groups}
    assert groups == {0.01: ids(ft.init_parameters(module.student)), 0.1: ids(ab.init_parameters(module.student))}
    fit(module, datamodule)  # both stages' losses train together in one fit


def test_init_terms_sharing_parameters_at_different_rates_are_refused():
    torch.manual_seed(0)
    datamodule = SyntheticDataModule(num_classes=10, in_channels=1, image_size=8, train_size=16, val_size=8,
                                     test_size=8, batch_size=8)
    module = Offline(student=build_model("convnet_small", num_classes=10, in_channels=1),
                     teacher=FrozenTeacher(build_model("convnet_small", num_classes=10, in_channels=1)),
                     terms={"ab": AB(), "fsp": FSP(init_lr=0.01)}, num_classes=10,
                     example_input=datamodule.example_input(), optimizer=torch.optim.SGD)
    module.set_init_stage(True)
    with pytest.raises(ConfigError, match="distill.ab.init_lr"):
        module.configure_optimizers()


def test_ft_paraphraser_stays_frozen_in_the_main_stage():
    term = FT()
    module, datamodule = small_pair("convnet_small", "convnet_large", term)
    paraphraser = [*term.paraphraser_encoder.parameters(), *term.paraphraser_decoder.parameters()]
    before_paraphraser = [p.detach().clone() for p in paraphraser]
    before_translator = [p.detach().clone() for p in term.translator.parameters()]
    fit(module, datamodule)
    assert all(torch.equal(b, p) for b, p in zip(before_paraphraser, paraphraser))
    assert any(not torch.equal(b, p) for b, p in zip(before_translator, term.translator.parameters()))


# ---------------------------------------------------------------- errors


def test_stage_aliases_expand_and_refuse_models_without_stages():
    assert expand_stage_aliases(["stages_pre", "penultimate"], ["stage1", "stage2"], "student") == [
        "stage1_pre", "stage2_pre", "penultimate"]
    assert expand_stage_aliases(["last_stage"], ["stage1", "stage2"], "student") == ["stage2"]
    with pytest.raises(ConfigError, match="declares no stages"):
        expand_stage_aliases(["stages_pre"], [], "teacher")


@pytest.mark.parametrize("make", [FT, AB, FSP])
def test_init_only_terms_refuse_a_missing_init_stage(make):
    with pytest.raises(ConfigError, match="init_epochs"):
        make(init_epochs=0)


def test_ft_refuses_an_unknown_factor():
    with pytest.raises(ConfigError, match="repdistiller"):
        FT(factor="attention")


def test_bad_tap_pairs_are_config_errors():
    three = pre_shapes((8, 16, 32), (8, 4, 2))
    with pytest.raises(ConfigError, match="counts differ"):
        built(AB(student_taps=["stage1_pre", "stage2_pre"]), three, three)
    with pytest.raises(ConfigError, match="spatial feature maps"):
        built(VID(student_taps=["penultimate"], teacher_taps=["stage1"]), {"penultimate": (BATCH, 8)},
              {"stage1": (BATCH, 8, 4, 4)})
    with pytest.raises(ConfigError, match="equal channel counts"):
        shapes = {"stem": (BATCH, 4, 8, 8), **stage_shapes((4, 8, 16), (8, 4, 2))}
        built(FSP(), shapes, {**shapes, "stage3": (BATCH, 32, 2, 2)})
    with pytest.raises(ConfigError, match="counts differ"):
        built(ReviewKD(student_taps=["stage1", "stage2", "penultimate"]),
              {**stage_shapes((4, 8), (8, 4)), "penultimate": (BATCH, 8)},
              {**pre_shapes((4, 8, 16), (8, 4, 2)), "penultimate": (BATCH, 16)})
    with pytest.raises(ConfigError, match="factor of 2"):
        connector(torch.Size((BATCH, 4, 12, 12)), torch.Size((BATCH, 4, 4, 4)), "stage1_pre", "stage1_pre")


class StagesWithoutPreActivation(nn.Module):
    """Declares stages but no `stageK_pre` taps, like torchvision's ResNets (whose ReLUs are shared and in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.Sequential(*[nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
                                      for c in (3, 8, 8)])
        self.fc = nn.Linear(8, 10)

    def declared_taps(self) -> Taps:
        return Taps(points={f"stage{k + 1}": f"stages.{k}" for k in range(3)}, stages=THREE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(x).mean(dim=(2, 3)))


def test_ofd_names_the_fix_for_teachers_it_cannot_read():
    datamodule = SyntheticDataModule(num_classes=10, image_size=32, train_size=8, val_size=8, test_size=8,
                                     batch_size=4)

    def offline(teacher: nn.Module) -> Offline:
        return Offline(student=build_model("resnet8", num_classes=10), teacher=FrozenTeacher(teacher),
                       terms={"ofd": OFD()}, num_classes=10, example_input=datamodule.example_input(),
                       optimizer=torch.optim.SGD)

    with pytest.raises(ConfigError, match=r"no tap 'stage1_pre'.*':input'"):
        offline(StagesWithoutPreActivation())
    with pytest.raises(ConfigError, match="BatchNorm2d that produced it"):
        # Its pre-ReLU stage output concatenates a BN output with a pass-through half.
        offline(build_model("ShuffleNetV2", num_classes=10))
