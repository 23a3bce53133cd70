"""OFA-KD: intermediate student features of any architecture, projected to logits by branch heads."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses import functional
from kd_lightning.losses.terms.base import STAGES, BuildContext, DistillInputs, DistillTerm, as_tap_list
from kd_lightning.taps import declared_taps
from kd_lightning.tokens import LAYOUT_ATTRIBUTE

# The reference merges ViT patch tokens down to a 7×7 grid, the resolution of a ResNet's last stage at 224².
FINAL_TOKEN_GRID = 7


class OFA(DistillTerm):
    """Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation",
    NeurIPS 2023; reference code Hao840/OFAKD `distillers/ofa.py` (class `OFA`, `ofa_loss`) and
    `distillers/utils.py` (`SepConv`, `PatchMerging`, `TokenFnContext`, `init_weights`).

    Each chosen student stage goes through its own branch head to `num_classes` logits, and each branch's
    logits, like the student's own final logits, are pulled to the teacher's logits by the adaptive
    target-enhanced loss (`functional.ofa_target_enhanced`, the code's `ofa_loss`):

        L = weight · Σ_k L_eps_k(branch_k(F_k), z_t) + weight · logits_weight · L_eps_last(z_s, z_t),
        L_eps(z_s, z_t) = mean_i −Σ_c [(p_t,ic + 1[c=y_i])^eps − 1[c=y_i]] · log softmax(z_s/T)_ic.

    Only the teacher's logits are read, so any teacher architecture works and the teacher cache applies.
    Parts logged: `branch1..N` (shallow to deep) and `logits`.

    Defaults are the reference's (`train.py` arguments and README): stages 1–4 (here every declared stage,
    `student_taps=stages`), eps 1 (README's CIFAR-100 command; its ImageNet ResNet-18 ← DeiT-T command uses
    1.5), one eps for all losses or one per branch plus one for the logits (`--ofa-eps`), T=1
    (`--ofa-temperature`), `--ofa-loss-weight` 1 (`weight`), `--kd-loss-weight` 1 on the final-logit loss
    (here relative to `weight`: `logits_weight`), `--gt-loss-weight` 1 (the recipe's CE weight).

    Branch heads, by the rank of the tapped tensor (built from the tap shapes; weights initialised as the
    reference's `init_weights`: Kaiming fan-out convs, truncated-normal(0.02) linears, unit BN):
      - B×C×H×W (CNN stage): d stride-2 `SepConv`s (depthwise-separable conv-BN-ReLU twice), channels
        doubling, the last to `width`; a 1×1 conv to `width` for the deepest stage (d = 0); then global
        average pooling and a linear layer. d is the number of the student's declared stages after this
        one (the reference's 4 − stage), for a tap given as a module path the number of the term's taps
        after it.
      - B×N×C (ViT/MLP tokens): prefix tokens (cls, + dist) are set aside, the patch tokens of a square
        grid are merged 2×2 (Swin's `PatchMerging`, the first to `student width`) until the grid is at most
        7×7, the prefix tokens rejoin, max(d, 1) timm `Block`s (4 heads) run, and the mean of the prefix
        tokens (the mean of all tokens without prefix) feeds a linear layer.
      - B×D (vectors, e.g. a plain MLP's hidden layers): linear to `width`, LayerNorm, GELU, linear.
    `width` is max(student, teacher) classifier input width for CNN and vector branches and the student's
    for token branches, as in the reference (`stage_info(-1)`, the pre-logit feature width).

    Where this differs from the reference code, and why:
      - The loss is the code's, not the paper's equation −(1 + p_t,y)^γ·log p_s,y − Σ_{c≠y} p_t,c·log p_s,c:
        the code subtracts the one-hot mask after the power (one CE less on the target, which the recipe's
        separate CE term supplies) and raises the non-target probabilities to eps too. The published eps
        and weights were tuned with the code (see `functional.ofa_target_enhanced`).
      - log_softmax instead of the code's log(softmax): equal where finite, no −inf under bf16.
      - The reference's CE is label-smoothed (0.1, timm's `--smoothing`); `Offline`'s CE has no smoothing.
      - Prefix tokens: the reference reads `student.num_tokens` (timm ≥ 0.6 calls it `num_prefix_tokens`,
        which is read here) and flattens them into a linear layer sized for one token, which fails for
        DeiT's cls + dist; here their mean is used (the same for one token).
      - Generalisations the reference does not have, none of which changes its own cases: stage counts
        other than four (d as above), a token width that differs from the student's feature width without
        merging (a linear map to it, of the prefix tokens too), token counts that are not a square grid
        (no merging), vector taps (the reference has no MLP whose stages are vectors; its MLPs emit tokens).
      - Models without declared stages (timm ViTs) are tapped by module path; the reference's stages of a
        12-block ViT/DeiT are `blocks.1`, `blocks.3`, `blocks.9`, `blocks.11` (`custom_forward/
        vision_transformer.py`, `stage_info`).
    """

    def __init__(self, weight: float = 1.0, student_taps: str | Sequence[str] = STAGES,
                 eps: float | Sequence[float] = 1.0, temperature: float = 1.0, logits_weight: float = 1.0,
                 width: int | None = None, heads: int = 4, prefix_tokens: int | None = None,
                 warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        eps_list = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
        if not eps_list or any(not e > 0 for e in eps_list):
            raise ConfigError(f"distill.ofa.eps must be a positive number or a list of them (one per branch plus "
                              f"one for the final logits), got {eps}. The reference uses 1 (CIFAR-100) or 1.5.")
        if not temperature > 0:
            raise ConfigError(f"distill.ofa.temperature must be > 0, got {temperature}; the reference uses 1.")
        if width is not None and width < 1:
            raise ConfigError(f"distill.ofa.width must be a positive integer or null (the networks' classifier "
                              f"input widths), got {width}.")
        if heads < 1:
            raise ConfigError(f"distill.ofa.heads must be >= 1, got {heads}; the reference uses 4.")
        if prefix_tokens is not None and prefix_tokens < 0:
            raise ConfigError(f"distill.ofa.prefix_tokens must be >= 0 or null (read from the student's "
                              f"`num_prefix_tokens`), got {prefix_tokens}.")
        self.student_taps = as_tap_list(student_taps)
        self.eps = eps_list
        self.temperature = float(temperature)
        self.logits_weight = float(logits_weight)
        self.width = width
        self.heads = int(heads)
        self.prefix_tokens = prefix_tokens
        self.student_stages: list[str] = []
        self.branches = nn.ModuleList()

    def expand_taps(self, student_stages: Sequence[str], teacher_stages: Sequence[str]) -> None:
        super().expand_taps(student_stages, teacher_stages)
        self.student_stages = list(student_stages)

    def resolve_model_taps(self, student: nn.Module, teacher: nn.Module) -> None:
        # The reference's ViT branches read tokens, class token included; `FeatureTaps` reads a ViT's declared
        # stages as maps of the patch tokens, so its stages are tapped by their module paths here.
        if getattr(student, LAYOUT_ATTRIBUTE, None) is None:
            return
        points = declared_taps(student).points
        self.student_taps = [points.get(tap, tap) for tap in self.student_taps]
        self.student_stages = [points.get(stage, stage) for stage in self.student_stages]

    def stages_after(self, index: int) -> int:
        """How many stages follow a tap: the reference sizes each branch by it (4 − stage)."""
        tap = self.student_taps[index]
        if tap in self.student_stages:
            return len(self.student_stages) - 1 - self.student_stages.index(tap)
        return len(self.student_taps) - 1 - index

    def build(self, context: BuildContext) -> None:
        if not self.student_taps:
            raise ConfigError("distill.ofa.student_taps is empty; OFA needs at least one student stage for a branch "
                              "head (the reference uses stages 1-4: student_taps=stages).")
        branch_count = len(self.student_taps)
        if len(self.eps) == 1:
            self.eps = self.eps * (branch_count + 1)
        elif len(self.eps) != branch_count + 1:
            raise ConfigError(
                f"distill.ofa.eps has {len(self.eps)} values for {branch_count} branches ({self.student_taps}) "
                f"and the final logits; give one value for all, or {branch_count + 1} (one per branch, then the "
                f"logits'), as the reference's --ofa-eps."
            )
        if context.num_classes < 1:
            raise ConfigError("OFA's branch heads predict the classes, but the run gives no num_classes.")
        student_width = self.width or feature_width(context.student, "student")
        widest = self.width or max(student_width, feature_width(context.teacher, "teacher"))
        prefix = self.prefix_tokens if self.prefix_tokens is not None else prefix_token_count(context.student)
        branches = []
        for index, tap in enumerate(self.student_taps):
            shape = context.student_shapes[tap]
            after = self.stages_after(index)
            if len(shape) == 4:
                branch = conv_branch(int(shape[1]), widest, after, context.num_classes)
            elif len(shape) == 3:
                branch = token_branch(tap, int(shape[1]), int(shape[2]), student_width, after, prefix,
                                      self.heads, context.num_classes)
            elif len(shape) == 2:
                branch = vector_branch(int(shape[1]), widest, context.num_classes)
            else:
                raise ConfigError(
                    f"OFA's branch heads read CNN maps (B,C,H,W), token sequences (B,N,C) or vectors (B,D); student "
                    f"tap {tap!r} has shape {tuple(shape)}. Tap a stage or block output instead (distill.ofa."
                    f"student_taps=stages, or module paths such as blocks.1 for a ViT)."
                )
            branch.apply(init_like_reference)
            branches.append(branch)
        self.branches = nn.ModuleList(branches)

    def loss(self, inputs: DistillInputs) -> dict[str, Tensor]:
        teacher, targets = inputs.teacher_logits, inputs.targets
        parts = {}
        for k, (tap, branch, eps) in enumerate(zip(self.student_taps, self.branches, self.eps), start=1):
            branch_logits = branch(inputs.student_features[tap])
            parts[f"branch{k}"] = functional.ofa_target_enhanced(branch_logits, teacher, targets, eps,
                                                                 self.temperature)
        final = functional.ofa_target_enhanced(inputs.student_logits, teacher, targets, self.eps[-1],
                                               self.temperature)
        parts["logits"] = self.logits_weight * final
        return parts


def prefix_token_count(model: nn.Module | None) -> int:
    """cls (+ dist) tokens ahead of the patch tokens: timm's `num_prefix_tokens`, found on the model or on a
    wrapped submodule; 0 for networks without one (CNNs, MLP-Mixers)."""
    for module in model.modules() if model is not None else ():
        count = getattr(module, "num_prefix_tokens", None)
        if isinstance(count, int):
            return count
    return 0


def feature_width(model: nn.Module | None, role: str) -> int:
    """The width of a network's pre-logit features (the reference's `stage_info(-1)`): timm's `num_features`,
    else the input width of its last linear layer (the classifier in nearly every network)."""
    width = getattr(model, "num_features", None)
    if isinstance(width, int) and width > 0:
        return width
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)] if model is not None else []
    if not linears:
        raise ConfigError(
            f"OFA sizes its branch heads by the {role}'s pre-logit feature width, but the {role} has no "
            f"`num_features` and no nn.Linear classifier to read it from. Set distill.ofa.width."
        )
    return linears[-1].in_features


def conv_branch(channels: int, width: int, stages_after: int, num_classes: int) -> nn.Sequential:
    if stages_after == 0:
        blocks: list[nn.Module] = [nn.Conv2d(channels, width, 1, 1, 0)]
    else:
        blocks = []
        for step in range(stages_after):
            out_channels = width if step == stages_after - 1 else channels * 2
            blocks.append(SepConv(channels, out_channels))
            channels *= 2
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def token_branch(tap: str, tokens: int, channels: int, width: int, stages_after: int, prefix: int, heads: int,
                 num_classes: int) -> nn.Module:
    if width % heads:
        raise ConfigError(
            f"OFA's branch for token tap {tap!r} runs transformer blocks of the student's width {width} with "
            f"{heads} heads, which does not divide it. Set distill.ofa.heads to a divisor of {width}, or "
            f"distill.ofa.width."
        )
    patches = tokens - prefix
    if patches < 1:
        raise ConfigError(
            f"Token tap {tap!r} has {tokens} tokens, but {prefix} are taken as prefix (cls/dist) tokens. Set "
            f"distill.ofa.prefix_tokens to the student's number of cls/dist tokens."
        )
    grid = math.isqrt(patches)
    merges = max(int(math.log2(grid / FINAL_TOKEN_GRID)), 0) if grid * grid == patches else 0
    mergers: list[nn.Module] = []
    for step in range(merges):
        side = grid // 2**step
        if side % 2:
            raise ConfigError(
                f"OFA merges the {grid}×{grid} patch grid of token tap {tap!r} 2×2 down to at most "
                f"{FINAL_TOKEN_GRID}×{FINAL_TOKEN_GRID}, but reaches the odd side {side}. Tap a stage whose "
                f"grid halves evenly, or set distill.ofa.prefix_tokens if cls/dist tokens were counted as patches."
            )
        mergers.append(PatchMerging(side, channels if step == 0 else width, width,
                                    nn.GELU() if step == 0 or step != merges - 1 else nn.Identity()))
    if not merges and channels != width:
        mergers.append(nn.Linear(channels, width))
    # The reference passes prefix tokens through unchanged, which fits because a ViT's tokens already have the
    # student's width; tokens of another width get a linear map to it, as the patches do.
    prefix_map = nn.Linear(channels, width) if prefix and channels != width else nn.Identity()
    from timm.models.vision_transformer import Block  # timm is imported only by runs that tap tokens

    blocks = nn.Sequential(*[Block(dim=width, num_heads=heads) for _ in range(max(stages_after, 1))])
    return TokenBranch(prefix, nn.Sequential(*mergers), prefix_map, blocks, nn.Linear(width, num_classes))


def vector_branch(features: int, width: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, width), nn.LayerNorm(width), nn.GELU(), nn.Linear(width, num_classes))


class SepConv(nn.Sequential):
    """The reference's stride-2 depthwise-separable block (from DARTS): two depthwise+pointwise conv-BN-ReLUs."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__(
            nn.Conv2d(channels_in, channels_in, 3, stride=2, padding=1, groups=channels_in, bias=False),
            nn.Conv2d(channels_in, channels_in, 1, bias=False),
            nn.BatchNorm2d(channels_in),
            nn.ReLU(),
            nn.Conv2d(channels_in, channels_in, 3, stride=1, padding=1, groups=channels_in, bias=False),
            nn.Conv2d(channels_in, channels_out, 1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(),
        )


class PatchMerging(nn.Module):
    """Swin's 2×2 patch merging on a side×side token grid: concatenate, LayerNorm, linear (no bias), activation."""

    def __init__(self, side: int, channels: int, out_channels: int, activation: nn.Module) -> None:
        super().__init__()
        self.side = side
        self.norm = nn.LayerNorm(4 * channels)
        self.reduction = nn.Linear(4 * channels, out_channels, bias=False)
        self.act = activation

    def forward(self, x: Tensor) -> Tensor:
        batch, _, channels = x.shape
        x = x.view(batch, self.side, self.side, channels)
        # Swin's order of the four neighbours, so a reference checkpoint's reduction weights would line up.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.act(self.reduction(self.norm(x.view(batch, -1, 4 * channels))))


class TokenBranch(nn.Module):
    """Merge the patch tokens, let the prefix tokens rejoin, run the blocks, pool, classify."""

    def __init__(self, prefix: int, merger: nn.Module, prefix_map: nn.Module, blocks: nn.Module,
                 head: nn.Linear) -> None:
        super().__init__()
        self.prefix = prefix
        self.merger = merger
        self.prefix_map = prefix_map
        self.blocks = blocks
        self.head = head

    def forward(self, tokens: Tensor) -> Tensor:
        patches = self.merger(tokens[:, self.prefix :])
        if not self.prefix:
            return self.head(self.blocks(patches).mean(dim=1))
        x = self.blocks(torch.cat([self.prefix_map(tokens[:, : self.prefix]), patches], dim=1))
        return self.head(x[:, : self.prefix].mean(dim=1))


def init_like_reference(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
