from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.terms.base import BuildContext, DistillInputs, DistillTerm
from kd_lightning.losses.terms.transformer import block_index, network_name, prefix_tokens, transformer_blocks


class ViTKD(DistillTerm):
    """Yang et al. 2022, "ViTKD: Practical Guidelines for ViT feature knowledge distillation"
    (yzd-v/cls_KD mmcls/models/dis_losses/vitkd.py, the DeiT III-S → DeiT-T config).

    Mimicking: the patch tokens of the first two blocks, each through its own linear map to the teacher's
    width (identity when the widths agree), against the teacher's same blocks: α·Σ(·)²/B. Generation: the
    final, normalised patch tokens mapped by another linear, a random `mask_ratio` (λ) of them replaced by a
    learnable mask token (per-sample argsort of uniform noise, as MAE), the token grid through
    conv3×3–ReLU–conv3×3 at the teacher's width, and the squared error to the teacher's final tokens on the
    masked positions only: β·Σ(·)²/(B·λ). Defaults α=3e-5, β=3e-6, λ=0.5 and CE 1 are the authors' recipe;
    the two parts are logged as `mimic` and `generate`, and `weight` scales both (1 in the recipe).

    The reference drops the first token (its DeiT III has one class token); here each network's
    `num_prefix_tokens` (class, distillation and register tokens in timm) are dropped, so distilled DeiTs
    compare patch tokens only as well. The high layer is the model's final `norm` output (the reference's
    `final_norm`); a model without `norm` uses its last block. Both networks need the same square patch grid.
    """

    def __init__(self, weight: float = 1.0, alpha: float = 3e-5, beta: float = 3e-6, mask_ratio: float = 0.5,
                 low_layers: Sequence[int] = (0, 1), warmup_epochs: int = 0) -> None:
        super().__init__(weight, warmup_epochs)
        if not 0 < mask_ratio < 1:
            raise ConfigError(f"distill.vitkd.mask_ratio is the share of final tokens the generator must fill in "
                              f"and lies strictly between 0 and 1 (the recipe's 0.5), got {mask_ratio}.")
        if alpha < 0 or beta < 0:
            raise ConfigError(f"distill.vitkd.alpha and beta weigh mimicking and generation and must be >= 0, got "
                              f"{alpha} and {beta}.")
        self.alpha, self.beta, self.mask_ratio = float(alpha), float(beta), float(mask_ratio)
        self.low_layers = [int(i) for i in low_layers]
        if not self.low_layers:
            raise ConfigError("distill.vitkd.low_layers names the shallow blocks to mimic and cannot be empty "
                              "(the recipe's [0, 1]).")
        self.low_aligners: nn.ModuleList | None = None
        self.high_aligner: nn.Module = nn.Identity()
        self.mask_token: nn.Parameter | None = None
        self.generation: nn.Module = nn.Identity()
        self._prefix = {"student": 0, "teacher": 0}

    def resolve_model_taps(self, student: nn.Module, teacher: nn.Module) -> None:
        self.student_taps = self._paths(student, "student")
        self.teacher_taps = self._paths(teacher, "teacher")
        self._prefix = {"student": prefix_tokens(student), "teacher": prefix_tokens(teacher)}

    def _paths(self, model: nn.Module, role: str) -> list[str]:
        blocks = transformer_blocks(model, role, "vitkd")
        prefix = next(name for name, module in model.named_modules() if module is blocks)
        low = [f"{prefix}.{block_index(i, len(blocks), 'distill.vitkd.low_layers', model, role)}"
               for i in self.low_layers]
        high = "norm" if isinstance(getattr(model, "norm", None), nn.Module) else f"{prefix}.{len(blocks) - 1}"
        return [*low, high]

    def build(self, context: BuildContext) -> None:
        student_shapes = [context.student_shapes[tap] for tap in self.student_taps]
        teacher_shapes = [context.teacher_shapes[tap] for tap in self.teacher_taps]
        student_patches = student_shapes[-1][1] - self._prefix["student"]
        teacher_patches = teacher_shapes[-1][1] - self._prefix["teacher"]
        if student_patches != teacher_patches:
            raise ConfigError(
                f"distill.vitkd compares patch tokens position by position, but the student has {student_patches} "
                f"patches and the teacher {teacher_patches}. Give both networks the same image size and patch size."
            )
        side = math.isqrt(student_patches)
        if side * side != student_patches:
            raise ConfigError(
                f"distill.vitkd's generator convolves the patch tokens as a square grid, but there are "
                f"{student_patches} of them. Use a square input and patch size (e.g. img_size 224, patch 16)."
            )
        student_width, teacher_width = student_shapes[-1][-1], teacher_shapes[-1][-1]
        if student_width != teacher_width:
            self.low_aligners = nn.ModuleList(nn.Linear(student_width, teacher_width) for _ in self.low_layers)
            self.high_aligner = nn.Linear(student_width, teacher_width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, teacher_width))
        self.generation = nn.Sequential(nn.Conv2d(teacher_width, teacher_width, 3, padding=1), nn.ReLU(),
                                        nn.Conv2d(teacher_width, teacher_width, 3, padding=1))

    def loss(self, inputs: DistillInputs) -> dict[str, Tensor]:
        student = [inputs.student_features[tap][:, self._prefix["student"]:] for tap in self.student_taps]
        teacher = [inputs.teacher_features[tap][:, self._prefix["teacher"]:] for tap in self.teacher_taps]
        batch = student[0].shape[0]
        mimic = sum(((aligner(s) if self.low_aligners is not None else s).float() - t.float()).pow(2).sum()
                    for aligner, s, t in zip(self.low_aligners or [None] * len(self.low_layers), student, teacher))
        high = self.high_aligner(student[-1])
        masked_input, mask = self._mask(high)
        side = math.isqrt(high.shape[1])
        grid = masked_input.transpose(1, 2).reshape(batch, -1, side, side)
        generated = self.generation(grid).flatten(2).transpose(1, 2)
        generate = ((generated.float() - teacher[-1].float()) * mask).pow(2).sum()
        return {"mimic": self.alpha * mimic / batch, "generate": self.beta * generate / (batch * self.mask_ratio)}

    def _mask(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Replace a random `mask_ratio` of each sample's tokens by the mask token; the mask is 1 where replaced.
        Draws the noise as the reference does (one torch.rand of B×N), so a seeded run masks the same tokens."""
        batch, length, _ = tokens.shape
        keep = int(length * (1 - self.mask_ratio))
        noise = torch.rand(batch, length, device=tokens.device)
        order = torch.argsort(noise, dim=1)
        kept = torch.zeros(batch, length, 1, dtype=torch.bool, device=tokens.device)
        kept.scatter_(1, order[:, :keep, None], True)
        filled = torch.where(kept, tokens, self.mask_token.to(tokens.dtype))
        return filled, (~kept).to(tokens.dtype)
