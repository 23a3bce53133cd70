"""OFA-KD's term: branch heads built from the tap shapes of CNN maps, ViT tokens and MLP vectors as the
reference (Hao840/OFAKD distillers/ofa.py) builds them, the loss parts against float64 arithmetic written
here, one training step for each pairing of architectures, and the settings it refuses."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import timm
import torch
from torch import nn

from kd_lightning.data import SyntheticDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms import OFA, BuildContext, DistillInputs
from kd_lightning.losses.terms.ofa import PatchMerging, SepConv, TokenBranch
from kd_lightning.models import build_model
from kd_lightning.schemes import Offline
from kd_lightning.teachers import FrozenTeacher

BATCH, CLASSES = 4, 10
RESNET18_STAGES = ("stage1", "stage2", "stage3", "stage4")


def tiny_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=32,
                             depth=4, num_heads=2, num_classes=CLASSES, in_chans=1)


class Classifier(nn.Module):
    """Stands in for a network whose pre-logit width the branches read (the last linear's input)."""

    def __init__(self, width: int, prefix_tokens: int | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(width, CLASSES)
        if prefix_tokens is not None:
            self.num_prefix_tokens = prefix_tokens


def built(term: OFA, shapes: dict, student: nn.Module, teacher: nn.Module, stages=RESNET18_STAGES) -> OFA:
    term.expand_taps(stages, stages)
    context = BuildContext(student_shapes={k: torch.Size(v) for k, v in shapes.items()}, teacher_shapes={},
                           student=student, teacher=teacher, num_classes=CLASSES)
    term.build(context)
    term.check("ofa", context)
    return term.eval()


# ---------------------------------------------------------------- branch heads


def test_cnn_branches_downsample_to_the_last_stage_like_the_reference_for_resnet18():
    # resnet18 at 224²: stages 64×56², 128×28², 256×14², 512×7²; DeiT-T teacher width 192, student 512.
    shapes = {f"stage{k}": (BATCH, c, s, s) for k, (c, s) in enumerate(zip((64, 128, 256, 512), (56, 28, 14, 7)), 1)}
    term = built(OFA(), shapes, Classifier(512), Classifier(192))
    for k, branch in enumerate(term.branches, start=1):
        sepconvs = [m for m in branch if isinstance(m, SepConv)]
        assert len(sepconvs) == 4 - k  # the reference's `down_sample_blk_num = 4 - stage`
        if k < 4:  # channels double per block, the last block maps to max(student, teacher) width
            assert [block[5].out_channels for block in sepconvs] == [*(shapes[f"stage{k}"][1] * 2**j
                                                                       for j in range(1, 4 - k)), 512]
        else:
            conv = branch[0]
            assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.out_channels == 512
        assert branch[-1].in_features == 512 and branch[-1].out_features == CLASSES
        assert branch(torch.randn(2, *shapes[f"stage{k}"][1:])).shape == (2, CLASSES)


def test_token_branches_accept_vit_blocks_with_a_cls_token_and_merge_a_14x14_grid_to_7x7():
    # DeiT-T blocks at 224²: 1 cls + 14×14 patches of width 192, tapped at blocks 1, 3, 9, 11 like the reference.
    taps = ["blocks.1", "blocks.3", "blocks.9", "blocks.11"]
    shapes = {tap: (BATCH, 197, 192) for tap in taps}
    term = built(OFA(student_taps=taps), shapes, Classifier(192, prefix_tokens=1), Classifier(512), stages=())
    for k, branch in enumerate(term.branches, start=1):
        assert isinstance(branch, TokenBranch) and branch.prefix == 1
        mergers = [m for m in branch.merger if isinstance(m, PatchMerging)]
        assert [m.side for m in mergers] == [14] and isinstance(mergers[0].act, nn.GELU)
        assert len(branch.blocks) == max(4 - k, 1)  # the reference's `max(4 - stage, 1)` blocks
        assert branch.blocks[0].attn.num_heads == 4 and branch.head.in_features == 192  # student width
    tokens = torch.randn(2, 197, 192)
    assert term.branches[0](tokens).shape == (2, CLASSES)
    assert term.branches[3].merger(tokens[:, 1:]).shape == (2, 49, 192)  # the reference's final 7×7 grid


def token_branch_reference(branch: TokenBranch, tokens: torch.Tensor) -> torch.Tensor:
    """The reference's TokenFnContext → blocks → TokenFilter(cls) → Linear, with the branch's own weights and
    the 2×2 merge written out by index."""
    cls, patches = tokens[:, :1], tokens[:, 1:]
    merger = branch.merger[0]
    n, _, c = patches.shape
    side = merger.side
    grid = patches.reshape(n, side, side, c)
    quads = [grid[:, i::2, j::2] for i, j in ((0, 0), (1, 0), (0, 1), (1, 1))]
    merged = merger.act(merger.reduction(merger.norm(torch.cat(quads, -1).reshape(n, -1, 4 * c))))
    x = branch.blocks(torch.cat([cls, merged], dim=1))
    return branch.head(x[:, 0])


def test_token_branch_matches_the_reference_order_of_operations():
    torch.manual_seed(0)
    shapes = {"blocks.1": (BATCH, 1 + 16 * 16, 32)}  # 16×16 grid: one merge to 8×8
    term = built(OFA(student_taps=["blocks.1"]), shapes, Classifier(32, prefix_tokens=1), Classifier(32), stages=())
    tokens = torch.randn(2, 257, 32)
    torch.testing.assert_close(term.branches[0](tokens), token_branch_reference(term.branches[0], tokens))


def test_token_branches_without_prefix_tokens_average_all_tokens_and_mixer_widths_are_projected():
    # An MLP-Mixer-like 8×8 token grid of width 24 without cls; the student's classifier width is 48.
    shapes = {"blocks.0": (BATCH, 64, 24)}
    term = built(OFA(student_taps=["blocks.0"]), shapes, Classifier(48), Classifier(16), stages=())
    branch = term.branches[0]
    assert branch.prefix == 0 and isinstance(branch.merger[0], nn.Linear) and branch.merger[0].out_features == 48
    assert branch(torch.randn(2, 64, 24)).shape == (2, CLASSES)


def test_vector_branches_map_mlp_hidden_layers_to_logits():
    shapes = {"layers.1": (BATCH, 40), "layers.3": (BATCH, 20)}
    term = built(OFA(student_taps=["layers.1", "layers.3"]), shapes, Classifier(20), Classifier(64), stages=())
    assert [b[0].out_features for b in term.branches] == [64, 64]
    assert term.branches[0](torch.randn(2, 40)).shape == (2, CLASSES)


def test_the_prefix_token_count_is_read_from_a_timm_vit():
    vit = tiny_vit()
    term = built(OFA(student_taps=["blocks.1"]), {"blocks.1": (BATCH, 17, 32)}, vit, Classifier(16), stages=())
    assert term.branches[0].prefix == vit.num_prefix_tokens == 1


# ---------------------------------------------------------------- the loss


def ref_ofa_loss(student_logits, teacher_logits, targets, eps):
    """Hao840/OFAKD `ofa_loss` at T=1 in float64: −Σ_c ((p_t + onehot)^eps − onehot) log p_s, batch mean."""
    s, t = student_logits.double().numpy(), teacher_logits.double().numpy()
    total = 0.0
    for i, y in enumerate(targets.tolist()):
        p_s = np.exp(s[i] - s[i].max()) / np.exp(s[i] - s[i].max()).sum()
        p_t = np.exp(t[i] - t[i].max()) / np.exp(t[i] - t[i].max()).sum()
        for c in range(len(p_s)):
            mask = 1.0 if c == y else 0.0
            total -= ((p_t[c] + mask) ** eps - mask) * math.log(p_s[c])
    return total / len(targets)


def test_loss_parts_are_the_reference_loss_of_each_branch_and_of_the_final_logits():
    torch.manual_seed(1)
    shapes = {"stage1": (BATCH, 8, 8, 8), "stage2": (BATCH, 16, 4, 4)}
    term = built(OFA(eps=[1.2, 1.5, 2.0], logits_weight=0.5), shapes, Classifier(16), Classifier(32),
                 stages=("stage1", "stage2"))
    features = {tap: torch.randn(shape) for tap, shape in shapes.items()}
    inputs = DistillInputs(student_logits=torch.randn(BATCH, CLASSES) * 3, targets=torch.tensor([0, 3, 9, 3]),
                           indices=torch.arange(BATCH), teacher_logits=torch.randn(BATCH, CLASSES) * 3,
                           student_features=features)
    parts = term.loss(inputs)
    assert list(parts) == ["branch1", "branch2", "logits"]
    with torch.no_grad():
        for k, eps in ((1, 1.2), (2, 1.5)):
            branch_logits = term.branches[k - 1](features[f"stage{k}"])
            expected = ref_ofa_loss(branch_logits, inputs.teacher_logits, inputs.targets, eps)
            assert parts[f"branch{k}"].item() == pytest.approx(expected, rel=1e-5)
    expected = 0.5 * ref_ofa_loss(inputs.student_logits, inputs.teacher_logits, inputs.targets, 2.0)
    assert parts["logits"].item() == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------- one training step per pairing


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(),
                                    nn.Linear(24, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def one_step(student: nn.Module, teacher: nn.Module, term: OFA) -> dict[str, float]:
    torch.manual_seed(0)
    datamodule = SyntheticDataModule(num_classes=CLASSES, in_channels=1, image_size=8, train_size=8, val_size=8,
                                     test_size=8, batch_size=8)
    module = Offline(student=student, teacher=FrozenTeacher(teacher), terms={"ofa": term}, num_classes=CLASSES,
                     example_input=datamodule.example_input(),
                     optimizer=lambda params, lr=0.1: torch.optim.SGD(params, lr=lr, momentum=0.9))
    before = [p.detach().clone() for p in term.branches.parameters()]
    losses: dict[str, float] = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
              log_every_n_steps=1, callbacks=[Record()]).fit(module, datamodule=datamodule)
    assert all(not torch.equal(b, p) for b, p in zip(before, term.branches.parameters()) if p.ndim > 1)
    return losses


@pytest.mark.parametrize("pairing", ["cnn_to_vit", "vit_to_cnn", "cnn_to_cnn", "cnn_to_mlp"])
def test_one_training_step_per_pairing_gives_a_finite_loss_and_trains_the_branches(pairing):
    torch.manual_seed(0)
    cnn = lambda name: build_model(name, num_classes=CLASSES, in_channels=1)  # noqa: E731
    student, teacher, taps = {
        "cnn_to_vit": (tiny_vit(), cnn("convnet_large"), ["blocks.1", "blocks.3"]),
        "vit_to_cnn": (cnn("convnet_tiny"), tiny_vit(), "stages"),
        "cnn_to_cnn": (cnn("convnet_tiny"), cnn("convnet_large"), "stages"),
        "cnn_to_mlp": (MLP(), cnn("convnet_large"), ["layers.2", "layers.4"]),
    }[pairing]
    losses = one_step(student, teacher, OFA(student_taps=taps))
    parts = [k for k in losses if k.startswith("train/ofa")]
    assert parts and all(math.isfinite(losses[k]) for k in parts), losses
    assert math.isfinite(losses["train/loss"])


# ---------------------------------------------------------------- refusals


def test_taps_of_other_ranks_wrong_eps_counts_and_indivisible_heads_are_config_errors():
    with pytest.raises(ConfigError, match="B,C,H,W"):
        built(OFA(student_taps=["x"]), {"x": (BATCH, 2, 3, 4, 5)}, Classifier(8), Classifier(8), stages=())
    with pytest.raises(ConfigError, match="B,C,H,W"):
        built(OFA(student_taps=["x"]), {"x": (BATCH,)}, Classifier(8), Classifier(8), stages=())
    with pytest.raises(ConfigError, match="3 values for 1 branches"):
        built(OFA(student_taps=["x"], eps=[1.0, 1.0, 1.0]), {"x": (BATCH, 8)}, Classifier(8), Classifier(8), stages=())
    with pytest.raises(ConfigError, match="heads"):
        built(OFA(student_taps=["x"]), {"x": (BATCH, 17, 30)}, Classifier(30), Classifier(8), stages=())
    with pytest.raises(ConfigError, match="odd side"):  # log2(30/7) → two merges, but 30 → 15 cannot halve again
        built(OFA(student_taps=["x"]), {"x": (BATCH, 30 * 30, 32)}, Classifier(32), Classifier(8), stages=())
    with pytest.raises(ConfigError, match="no `num_features`"):
        built(OFA(student_taps=["x"]), {"x": (BATCH, 8)}, nn.Conv2d(1, 1, 1), Classifier(8), stages=())
    with pytest.raises(ConfigError, match="positive"):
        OFA(eps=0.0)


def test_ofa_reads_only_the_teachers_logits_so_the_teacher_cache_takes_it(tmp_path):
    from kd_lightning.teacher_cache import TeacherCacheOptions

    datamodule = SyntheticDataModule(num_classes=CLASSES, in_channels=1, image_size=8, train_size=8, val_size=8,
                                     test_size=8, batch_size=8)
    module = Offline(student=tiny_vit(), teacher=build_model("convnet_large", CLASSES, 1),
                     terms={"ofa": OFA(student_taps=["blocks.1"])}, num_classes=CLASSES,
                     example_input=datamodule.example_input(), optimizer=torch.optim.SGD,
                     teacher_cache=TeacherCacheOptions(storage="memory", directory=tmp_path, dtype="float32"))
    assert module.terms["ofa"].teacher_taps == [] and module.teacher_outputs is not None


def test_a_zoo_vit_students_branches_read_its_tokens_class_token_included():
    # timm: models declare stages that FeatureTaps reads as patch maps; OFA's ViT branches are the reference's
    # token branches, so it taps the same blocks by module path.
    from kd_lightning.models import build_model
    from kd_lightning.schemes import Offline
    from kd_lightning.losses.terms.ofa import OFA
    from scheme_cases import VIT_DIGITS

    student = build_model(**VIT_DIGITS, num_classes=10, in_channels=1)
    teacher = build_model("convnet_large", num_classes=10, in_channels=1)
    module = Offline(student=student, teacher=teacher, terms={"ofa": OFA()}, num_classes=10,
                     example_input=torch.randn(2, 1, 8, 8), optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    term = module.terms["ofa"]
    assert all(tap.startswith("blocks.") for tap in term.student_taps)
    student(torch.randn(3, 1, 8, 8))
    assert all(feature.dim() == 3 and feature.shape[1] == 17 for feature in module.student_taps.features.values())
