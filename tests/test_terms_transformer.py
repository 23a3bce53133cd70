"""Transformer terms (MiniLM / MiniLMv2 / MiniViT relations, ViTKD): the attention probabilities the hooks read,
each loss against float64 reference arithmetic written here from the papers and reference code, DDP, and the
errors users get."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms import MiniLM, ViTKD
from kd_lightning.losses.terms.base import DistillInputs
from kd_lightning.models import build_model
from kd_lightning.schemes import Offline
from kd_lightning.teachers import FrozenTeacher

BATCH = 3


def vit(embed_dim: int = 32, depth: int = 3, num_heads: int = 2, patch_size: int = 2) -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=patch_size,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, num_classes=10, in_chans=1)


def offline(student: nn.Module, teacher: nn.Module, term) -> Offline:
    return Offline(student=student, teacher=FrozenTeacher(teacher), terms={"t": term}, num_classes=10,
                   example_input=torch.randn(2, 1, 8, 8), optimizer=torch.optim.SGD)


def random_inputs(term, module: Offline, seed: int = 0) -> DistillInputs:
    """Random tensors of the shapes the term's taps recorded (features far from the models' own)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"student": module.student_taps, "teacher": module.teacher_taps}
    module.example_forward(torch.randn(BATCH, 1, 8, 8, generator=gen))
    features = {role: {name: torch.randn(t.shape, generator=gen) for name, t in taps.features.items()}
                for role, taps in shapes.items()}
    for role in ("student", "teacher"):
        for name, tensor in features[role].items():
            if name.endswith("attn_drop:input"):  # probabilities: rows on the simplex
                features[role][name] = tensor.mul(3).softmax(dim=-1)
    return DistillInputs(student_logits=torch.zeros(BATCH, 10), targets=torch.zeros(BATCH, dtype=torch.long),
                         indices=torch.arange(BATCH), student_features=features["student"],
                         teacher_features=features["teacher"])


# ---------------------------------------------------------------- attention probabilities through the hooks


def test_captured_attention_equals_a_manual_softmax_and_only_tapped_blocks_are_unfused():
    torch.manual_seed(0)
    student, teacher = vit(), vit()
    term = MiniLM(relations=["attention"], student_layers=[1], teacher_layers=[-1])
    module = offline(student, teacher, term)
    assert [block.attn.fused_attn for block in student.blocks] == [True, False, True]
    assert [block.attn.fused_attn for block in teacher.blocks] == [True, True, False]
    assert term.unfused_attention == ["student:blocks.1.attn", "teacher:blocks.2.attn"]
    attention = student.blocks[1].attn
    seen = {}
    handle = attention.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    student.eval()
    with torch.no_grad():
        student(torch.randn(BATCH, 1, 8, 8))
    handle.remove()
    x = seen["x"].double()
    qkv = x @ attention.qkv.weight.double().T + attention.qkv.bias.double()
    width = attention.head_dim
    expected = torch.empty(BATCH, 2, 17, 17, dtype=torch.float64)
    for head in range(2):
        q = qkv[..., head * width:(head + 1) * width]
        k = qkv[..., 32 + head * width:32 + (head + 1) * width]
        expected[:, head] = torch.softmax(torch.einsum("bid,bjd->bij", q, k) / math.sqrt(width), dim=-1)
    captured = module.student_taps.features["blocks.1.attn.attn_drop:input"]
    torch.testing.assert_close(captured.double(), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- MiniLM / MiniLMv2 / MiniViT formulas


def relation_probabilities(qkv: torch.Tensor, pair: str, heads: int) -> torch.Tensor:
    """MiniLMv2 eq. 2: the q|k|v vectors split into `heads` relation heads, softmax(X_a Y_aᵀ/√d_r) per head."""
    batch, tokens, triple = qkv.shape
    channels = triple // 3
    vectors = {"q": qkv[..., :channels], "k": qkv[..., channels:2 * channels], "v": qkv[..., 2 * channels:]}
    width = channels // heads
    out = torch.empty(batch, heads, tokens, tokens, dtype=torch.float64)
    for a in range(heads):
        first = vectors[pair[0]][..., a * width:(a + 1) * width].double()
        second = vectors[pair[1]][..., a * width:(a + 1) * width].double()
        for b in range(batch):
            out[b, a] = torch.softmax(first[b] @ second[b].T / math.sqrt(width), dim=-1)
    return out


def kl_rows(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """1/(A·|x|) Σ_a Σ_t KL(teacher row ‖ student row), averaged over the batch too."""
    teacher, student = teacher.double(), student.double()
    return (teacher * (teacher.log() - student.log())).sum(dim=-1).mean()


def hidden_relation_reference(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    # Cream MiniViT/Mini-Swin main.py cal_hidden_relation_loss: mean squared cosine-relation gap × tokens.
    def relation(h):
        h = h.double()
        h = h / h.norm(dim=-1, keepdim=True)
        return torch.einsum("bid,bjd->bij", h, h)

    return ((relation(student) - relation(teacher)) ** 2).mean() * student.shape[1]


@pytest.mark.parametrize("relation_heads", [None, 8])
def test_minilm_v2_relations_match_the_reference_across_widths_and_head_counts(relation_heads):
    torch.manual_seed(0)
    term = MiniLM(relation_heads=relation_heads)  # defaults: qq, kk, vv of the last blocks
    module = offline(vit(32, 3, 2), vit(64, 4, 4), term)
    assert term.student_taps == ["blocks.2.attn.qkv"] and term.teacher_taps == ["blocks.3.attn.qkv"]
    inputs = random_inputs(term, module)
    parts = term.loss(inputs)
    heads = relation_heads or 4  # null: the teacher's attention head count
    s, t = inputs.student_features["blocks.2.attn.qkv"], inputs.teacher_features["blocks.3.attn.qkv"]
    assert sorted(parts) == ["kk", "qq", "vv"]
    for pair in ("qq", "kk", "vv"):
        expected = kl_rows(relation_probabilities(t, pair, heads), relation_probabilities(s, pair, heads))
        assert parts[pair].item() == pytest.approx(expected.item(), rel=1e-5)


def test_minilm_v1_attention_and_value_relation_match_the_reference():
    torch.manual_seed(0)
    term = MiniLM(relations=["attention", "vv"])
    module = offline(vit(32, 3, 2), vit(48, 2, 2), term)
    inputs = random_inputs(term, module)
    parts = term.loss(inputs)
    attention = kl_rows(inputs.teacher_features["blocks.1.attn.attn_drop:input"],
                        inputs.student_features["blocks.2.attn.attn_drop:input"])
    # v1's value relation: softmax(V_a V_aᵀ/√d_k) per attention head of each network.
    value = kl_rows(relation_probabilities(inputs.teacher_features["blocks.1.attn.qkv"], "vv", 2),
                    relation_probabilities(inputs.student_features["blocks.2.attn.qkv"], "vv", 2))
    assert parts["attention"].item() == pytest.approx(attention.item(), rel=1e-5)
    assert parts["vv"].item() == pytest.approx(value.item(), rel=1e-5)


def test_minivit_averages_nine_relations_per_layer_pair_and_adds_the_hidden_relation():
    torch.manual_seed(0)
    pairs = [a + b for a in "qkv" for b in "qkv"]
    term = MiniLM(relations=pairs, relation_heads=1, average_relations=True, hidden_relation_weight=0.1,
                  student_layers=[0, -1], teacher_layers=[1, 3])
    module = offline(vit(32, 3, 2), vit(64, 4, 4), term)
    inputs = random_inputs(term, module)
    parts = term.loss(inputs)
    s, t = inputs.student_features, inputs.teacher_features
    layers = [("blocks.0", "blocks.1"), ("blocks.2", "blocks.3")]
    # Cream cal_relation_loss: Σ over layers and the 9 pairs / (9 · layers), one relation head (--ar 1).
    relations = sum(kl_rows(relation_probabilities(t[f"{tl}.attn.qkv"], pair, 1),
                            relation_probabilities(s[f"{sl}.attn.qkv"], pair, 1))
                    for sl, tl in layers for pair in pairs) / (9 * 2)
    hidden = sum(hidden_relation_reference(s[sl], t[tl]) for sl, tl in layers) / 2
    assert parts["attention"].item() == pytest.approx(relations.item(), rel=1e-5)
    assert parts["hidden"].item() == pytest.approx(0.1 * hidden.item(), rel=1e-5)


# ---------------------------------------------------------------- ViTKD formula


def vitkd_reference(term: ViTKD, low_s, low_t, high_s, high_t, alpha=3e-5, beta=3e-6, ratio=0.5):
    """yzd-v/cls_KD ViTKDLoss.forward in float64 with the term's parameters; the noise draw is the reference's
    torch.rand(B, N), so the same seed masks the same tokens."""
    d = lambda m: {k: v.double() for k, v in m.state_dict().items()}  # noqa: E731
    low_s, low_t, high_s, high_t = (x.double() for x in (low_s, low_t, high_s, high_t))
    batch = low_s.shape[0]
    if term.low_aligners is not None:
        xc = torch.stack([F.linear(low_s[:, i], **d(term.low_aligners[i])) for i in range(2)], dim=1)
        x = F.linear(high_s, **d(term.high_aligner))
    else:
        xc, x = low_s, high_s
    loss_lr = ((xc - low_t) ** 2).sum() / batch * alpha
    batch, tokens, width = x.shape
    keep = int(tokens * (1 - ratio))
    noise = torch.rand(batch, tokens)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    kept = torch.gather(x, 1, shuffle[:, :keep, None].repeat(1, 1, width))
    mask = torch.ones(batch, tokens, dtype=torch.float64)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    tokens_ = torch.cat([kept, term.mask_token.double().repeat(batch, tokens - keep, 1)], dim=1)
    x = torch.gather(tokens_, 1, restore[..., None].repeat(1, 1, width))
    side = int(tokens ** 0.5)
    x = x.reshape(batch, side, side, width).permute(0, 3, 1, 2)
    conv1, conv2 = d(term.generation[0]), d(term.generation[2])
    x = F.conv2d(F.relu(F.conv2d(x, conv1["weight"], conv1["bias"], padding=1)), conv2["weight"], conv2["bias"],
                 padding=1).flatten(2).transpose(1, 2)
    loss_gen = ((x * mask[..., None] - high_t * mask[..., None]) ** 2).sum() / batch * beta / ratio
    return loss_lr, loss_gen


@pytest.mark.parametrize("teacher_width", [32, 64])
def test_vitkd_matches_the_reference_loss(teacher_width):
    torch.manual_seed(0)
    term = ViTKD()
    module = offline(vit(32, 3, 2), vit(teacher_width, 4, 4), term)
    assert term.student_taps == ["blocks.0", "blocks.1", "norm"]
    assert (term.low_aligners is None) == (teacher_width == 32)
    with torch.no_grad():  # a non-zero mask token, so a wrong mask position changes the loss
        term.mask_token.normal_()
    inputs = random_inputs(term, module)
    s = [inputs.student_features[tap][:, 1:] for tap in term.student_taps]  # the class token dropped
    t = [inputs.teacher_features[tap][:, 1:] for tap in term.teacher_taps]
    torch.manual_seed(5)
    parts = term.loss(inputs)
    torch.manual_seed(5)
    mimic, generate = vitkd_reference(term, torch.stack(s[:2], 1), torch.stack(t[:2], 1), s[2], t[2])
    assert parts["mimic"].item() == pytest.approx(mimic.item(), rel=1e-5)
    assert parts["generate"].item() == pytest.approx(generate.item(), rel=1e-5)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("term", [MiniLM, ViTKD])
def test_a_cnn_is_refused_with_one_paragraph(term):
    cnn = build_model("convnet_small", num_classes=10, in_channels=1)
    with pytest.raises(ConfigError, match="no transformer blocks") as error:
        offline(cnn, vit(), term())
    assert "\n" not in str(error.value) and "student" in str(error.value) and "distill=[at]" in str(error.value)


def test_different_token_counts_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="same image size and patch size"):
        offline(vit(patch_size=4), vit(64, 4, 4), MiniLM())
    with pytest.raises(ConfigError, match="same image size and patch size"):
        offline(vit(patch_size=4), vit(64, 4, 4), ViTKD())


def test_attention_across_head_counts_and_indivisible_relation_heads_are_refused():
    with pytest.raises(ConfigError, match="relation_heads, which allow different head counts"):
        offline(vit(32, 3, 2), vit(64, 4, 4), MiniLM(relations=["attention"]))
    with pytest.raises(ConfigError, match="common divisor"):
        offline(vit(32, 3, 2), vit(48, 2, 2), MiniLM(relation_heads=3))


@pytest.mark.parametrize("options,match", [({"relations": ["qx"]}, "two letters"),
                                           ({"student_layers": [-1, -2]}, "same non-zero length"),
                                           ({"teacher_layers": [7]}, "names no block")])
def test_minilm_option_mistakes_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        offline(vit(), vit(), MiniLM(**options))

