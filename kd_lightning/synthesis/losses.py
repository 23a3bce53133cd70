"""Synthesis objectives: what inputs are optimised for when no training image may be used.

Each reproduces its authors' reference code (NVlabs/DeepInversion, zju-vipa/Fast-Datafree), so the
published weights apply unchanged; where that code departs from the paper the docstring says so.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from kd_lightning.errors import ConfigError


def batch_norm_layers(network: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers whose running statistics describe the training data (those that keep them)."""
    return [m for m in network.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]


def require_batch_norm(network: nn.Module, scheme: str) -> list[_BatchNorm]:
    layers = batch_norm_layers(network)
    if not layers:
        raise ConfigError(
            f"{scheme} inverts the teacher's BatchNorm running statistics, but the teacher "
            f"{type(network).__name__} has no BatchNorm layer with running statistics. Use a teacher with "
            "BatchNorm (e.g. teacher=resnet20, convnet_tiny, or a zoo model with BN), or a data-free scheme "
            "that needs no BN statistics (DAFL, DFAD, ZSKT).")
    return layers


class BatchNormStatistics:
    """DeepInversion's feature-distribution prior, one forward hook per BatchNorm layer.

    Per layer: ‖μ_BN − μ(x)‖₂ + ‖σ²_BN − σ²(x)‖₂ (norms, not squared; biased variance), where μ(x), σ²(x)
    are the per-channel batch statistics of the layer's input (NVlabs DeepInversionFeatureHook). With
    `momentum` m > 0 (Fast-Datafree's `bn_mmt`) the batch statistics are first blended with an exponential
    average kept across synthesis rounds: (1−m)·stat(x) + m·stat_avg, and `end_round` folds the last
    batch into the average. The hooks exist only inside `with stats:`, so ordinary forwards pay nothing.
    """

    def __init__(self, network: nn.Module, momentum: float = 0.0, scheme: str = "DeepInversion") -> None:
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"{scheme}: the BN-statistics momentum must be in [0, 1), got {momentum}.")
        self.layers = require_batch_norm(network, scheme)
        self.momentum = momentum
        self.averages: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)
        self.losses: list[Tensor | None] = [None] * len(self.layers)
        self._last: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)
        self._handles: list[Any] = []

    def __enter__(self) -> "BatchNormStatistics":
        self._handles = [layer.register_forward_hook(self._hook(k)) for k, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, index: int):
        def hook(module: _BatchNorm, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            feature = inputs[0].float()
            dims = [d for d in range(feature.ndim) if d != 1]
            mean = feature.mean(dims)
            var = feature.var(dims, unbiased=False)
            self._last[index] = (mean.detach(), var.detach())
            average = self.averages[index]
            if average is not None:
                mean = (1 - self.momentum) * mean + self.momentum * average[0]
                var = (1 - self.momentum) * var + self.momentum * average[1]
            self.losses[index] = (torch.linalg.vector_norm(module.running_var.float() - var)
                                  + torch.linalg.vector_norm(module.running_mean.float() - mean))
        return hook

    def loss(self, first_multiplier: float = 1.0) -> Tensor:
        """Σ over layers of the last forward's prior, the first layer's scaled (NVlabs `first_bn_multiplier`)."""
        if any(part is None for part in self.losses):
            raise RuntimeError("BatchNormStatistics.loss() before a forward inside `with stats:`")
        parts = [part for part in self.losses if part is not None]
        return first_multiplier * parts[0] + sum(parts[1:], torch.zeros_like(parts[0]))

    def end_round(self) -> None:
        """Fold the round's last batch statistics into the averages (Fast's `update_mmt`); no-op without momentum."""
        if self.momentum == 0.0:
            return
        for k, last in enumerate(self._last):
            if last is None:
                continue
            average = self.averages[k]
            self.averages[k] = last if average is None else (
                self.momentum * average[0] + (1 - self.momentum) * last[0],
                self.momentum * average[1] + (1 - self.momentum) * last[1])

    def state_dict(self) -> dict[str, Any]:
        return {"averages": [None if a is None else (a[0].clone(), a[1].clone()) for a in self.averages]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        averages = state["averages"]
        if len(averages) != len(self.layers):
            raise ConfigError(f"The checkpoint holds BN averages for {len(averages)} layers, the teacher has "
                              f"{len(self.layers)}: resume with the teacher the checkpoint was trained with.")
        self.averages = [None if a is None else (a[0].to(layer.running_mean.device), a[1].to(layer.running_mean.device))
                         for a, layer in zip(averages, self.layers)]


def total_variation(images: Tensor) -> tuple[Tensor, Tensor]:
    """NVlabs `get_image_prior_losses`: (TV-l1, TV-l2) over horizontal, vertical and both diagonal neighbours.

    TV-l1 is the sum of the four mean absolute differences; TV-l2 the sum of the four differences'
    Frobenius norms (a norm over the whole batch, not squared and not averaged, as the code has it).
    """
    diffs = (images[:, :, :, :-1] - images[:, :, :, 1:],
             images[:, :, :-1, :] - images[:, :, 1:, :],
             images[:, :, 1:, :-1] - images[:, :, :-1, 1:],
             images[:, :, :-1, :-1] - images[:, :, 1:, 1:])
    tv_l1 = sum((d.abs().mean() for d in diffs), images.new_zeros(()))
    tv_l2 = sum((torch.linalg.vector_norm(d) for d in diffs), images.new_zeros(()))
    return tv_l1, tv_l2


def input_l2(images: Tensor) -> Tensor:
    """NVlabs ImageNet `loss_l2`: the mean over the batch of each image's l2 norm."""
    return torch.linalg.vector_norm(images.flatten(1), dim=1).mean()


def adi_competition(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 3.0) -> Tensor:
    """Adaptive DeepInversion's competition term, 1 − JS(T, S), as NVlabs codes it.

    P = softmax(S/T), Q = softmax(T/T), M = (P+Q)/2, each clamped to [0.01, 0.99] after M is formed;
    JS' = ½·KL(M‖P) + ½·KL(M‖Q) (KLDivLoss(log P, M), batch mean) — the divergence *from* M, not the
    paper's KL(P‖M) — and the term is 1 − clamp(JS', 0, 1), so minimising it seeks disagreement.
    """
    p = F.softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    divergence = 0.5 * F.kl_div(p.log(), m, reduction="batchmean") + 0.5 * F.kl_div(q.log(), m, reduction="batchmean")
    return 1.0 - divergence.clamp(0.0, 1.0)


def agreement_adversarial(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Fast-Datafree's adversarial term: −mean_i [ 1{argmax S_i = argmax T_i} · KL(softmax T_i ‖ softmax S_i) ].

    Only samples the student already classifies as the teacher does push the generator (the mask), so
    the generator seeks hard samples without drifting off the teacher's classes; the mean runs over the
    whole batch, masked samples counting as zero (fast_meta.py `loss_adv`, T = 1).
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    agree = (student_logits.argmax(1) == teacher_logits.argmax(1)).float()
    per_sample = F.kl_div(F.log_softmax(student_logits, dim=1), F.log_softmax(teacher_logits, dim=1),
                          reduction="none", log_target=True).sum(1)
    return -(per_sample * agree).mean()
