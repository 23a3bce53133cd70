"""DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill"): a batch of inputs optimised by Adam
against the frozen teacher — CE to chosen labels, the BN-statistics prior, TV and l2 image priors and,
for Adaptive DeepInversion, a competition term that seeks teacher–student disagreement."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.synthesis.augment import jitter_flip
from kd_lightning.synthesis.losses import BatchNormStatistics, adi_competition, input_l2, total_variation


@contextmanager
def synthesis_mode(teacher: nn.Module, student: nn.Module | None) -> Iterator[None]:
    """Teacher and student in eval mode (BN reads running statistics and never updates them) and their
    parameters out of autograd for the duration; modes and flags are restored afterwards."""
    networks = [teacher] + ([student] if student is not None else [])
    modes = [[m.training for m in net.modules()] for net in networks]
    flags = [[p.requires_grad for p in net.parameters()] for net in networks]
    try:
        for net in networks:
            net.eval()
            net.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for net, net_modes, net_flags in zip(networks, modes, flags):
            for module, mode in zip(net.modules(), net_modes):
                module.training = mode
            for parameter, flag in zip(net.parameters(), net_flags):
                parameter.requires_grad_(flag)


def pixel_bounds(mean: Sequence[float] | None, std: Sequence[float] | None,
                 channels: int) -> tuple[Tensor, Tensor] | None:
    """Per-channel bounds of the normalised inputs whose pixels lie in [0, 1] (DF `clip_images`)."""
    if mean is None or std is None:
        return None
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
    if mean_t.numel() == 1:
        mean_t, std_t = mean_t.expand(channels), std_t.expand(channels)
    if mean_t.numel() != channels or std_t.numel() != channels:
        raise ConfigError(f"Normalisation mean/std of {mean_t.numel()}/{std_t.numel()} values for {channels}-channel "
                          "images: give one value per channel, or one for all.")
    return ((0 - mean_t) / std_t).view(1, -1, 1, 1), ((1 - mean_t) / std_t).view(1, -1, 1, 1)


def balanced_labels(batch_size: int, num_classes: int) -> Tensor:
    """0, 1, …, K−1, 0, 1, … — every class in every batch (NVlabs CIFAR's fixed targets)."""
    return torch.arange(batch_size) % num_classes



def keep_best(best: tuple[Tensor, Tensor] | None, loss: Tensor, candidate: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, batch) of the strictly lower loss so far, the first call always taken (`best` None), as the
    references' `if best_cost > loss.item() or iteration == 1` chooses it, but on the device: a synthesis
    round of thousands of steps waits for no host copy. Which batch goes with a loss is the caller's choice."""
    loss, candidate = loss.detach(), candidate.detach()
    if best is None:
        return loss, candidate.clone()
    better = loss < best[0]  # a NaN loss is never better, as in the host comparison
    return torch.where(better, loss, best[0]), torch.where(better, candidate, best[1])

class DeepInversionSynthesizer:
    """One `synthesize` call = one batch: Gaussian inputs, `iterations` Adam steps, the final iterate kept.

    The final iterate is what NVlabs' CIFAR code returns, whose settings these defaults are: its
    `best_inputs = inputs.data` aliases the optimised tensor, which every later `optimizer.step()` moves.
    `keep_best=True` keeps what their ImageNet code keeps (deepinversion.py:349-357): the iteration whose loss
    was lowest so far (strictly lower; the first iteration always counts) has its inputs copied after that
    iteration's Adam step and pixel clip — the iterate following the lowest loss, not the one it was measured on.

    Loss per step (NVlabs deepinversion.py): ce_weight·CE(T(x̃), y) + bn_weight·R_BN(first_bn_multiplier)
    + tv_l1·TV₁(x̃) + tv_l2·TV₂(x̃) + l2·mean‖x̃‖ + adi_weight·(1 − JS(T(x̃), S(x̃))), x̃ the jittered
    (and flipped) view. Inputs live in the teacher's normalised input space and are clipped to the
    pixel range [0, 1] after each step when `mean`/`std` are given. Defaults: the CIFAR-10 README
    (bs 256, 2k iterations, lr 0.05, r_feature 10, TV-l2 2.5e-5, jitter 2, no flip, no ADI).
    The Adam state is fresh for every batch, as in the reference, so the state to keep is the RNG's.
    """

    def __init__(self, teacher: nn.Module, num_classes: int, image_shape: Sequence[int], batch_size: int = 256,
                 iterations: int = 2000, lr: float = 0.05, betas: Sequence[float] = (0.9, 0.999),
                 ce_weight: float = 1.0, bn_weight: float = 10.0, first_bn_multiplier: float = 1.0,
                 tv_l1: float = 0.0, tv_l2: float = 2.5e-5, l2: float = 0.0, adi_weight: float = 0.0,
                 adi_temperature: float = 3.0, jitter: int = 2, flip: bool = False, random_labels: bool = False,
                 keep_best: bool = False, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 seed: int = 0) -> None:
        for name, value in (("batch_size", batch_size), ("iterations", iterations)):
            if int(value) <= 0:
                raise ConfigError(f"DeepInversion's {name} must be a positive integer, got {value}.")
        self.teacher = teacher
        self.statistics = BatchNormStatistics(teacher, scheme="DeepInversion")
        self.num_classes = int(num_classes)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.batch_size, self.iterations = int(batch_size), int(iterations)
        self.lr, self.betas = float(lr), (float(betas[0]), float(betas[1]))
        self.ce_weight, self.bn_weight, self.first_bn_multiplier = ce_weight, bn_weight, first_bn_multiplier
        self.tv_l1, self.tv_l2, self.l2 = tv_l1, tv_l2, l2
        self.adi_weight, self.adi_temperature = adi_weight, adi_temperature
        self.jitter, self.flip, self.random_labels = int(jitter), bool(flip), bool(random_labels)
        self.keep_best = bool(keep_best)
        self.bounds = pixel_bounds(mean, std, self.image_shape[0])
        self.rng = torch.Generator().manual_seed(int(seed))
        self.rounds = 0

    def _labels(self) -> Tensor:
        if self.random_labels:
            return torch.randint(self.num_classes, (self.batch_size,), generator=self.rng)
        return balanced_labels(self.batch_size, self.num_classes)

    def synthesize(self, student: nn.Module | None = None) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(images, labels, last-step loss parts); `student` is needed only when `adi_weight` > 0."""
        if self.adi_weight and student is None:
            raise ConfigError("Adaptive DeepInversion (adi_weight > 0) needs the student to compete with.")
        device = next(self.teacher.parameters()).device
        labels = self._labels().to(device)
        inputs = torch.randn((self.batch_size, *self.image_shape), generator=self.rng).to(device).requires_grad_()
        optimizer = torch.optim.Adam([inputs], lr=self.lr, betas=self.betas)
        best: tuple[Tensor, Tensor] | None = None
        parts: dict[str, Tensor] = {}
        with synthesis_mode(self.teacher, student if self.adi_weight else None), self.statistics:
            for _ in range(self.iterations):
                view = jitter_flip(inputs, self.jitter, self.flip, self.rng)
                parts = self._loss_parts(view, labels, student)
                loss = sum(parts.values())
                (gradient,) = torch.autograd.grad(loss, [inputs])
                inputs.grad = gradient
                optimizer.step()
                if self.bounds is not None:
                    with torch.no_grad():
                        inputs.copy_(torch.maximum(torch.minimum(inputs, self.bounds[1].to(device)),
                                                   self.bounds[0].to(device)))
                if self.keep_best:
                    # After the step and clip, as deepinversion.py:349-357 copies `inputs.data`: the batch kept
                    # is the one the lowest loss was followed by, not the one it was measured on.
                    best = keep_best(best, loss, inputs)
        self.rounds += 1
        images = best[1] if best is not None else inputs.detach().clone()
        return images, labels, {name: value.detach() for name, value in parts.items()}

    def _loss_parts(self, view: Tensor, labels: Tensor, student: nn.Module | None) -> dict[str, Tensor]:
        teacher_logits = self.teacher(view)
        parts = {"ce": self.ce_weight * F.cross_entropy(teacher_logits.float(), labels),
                 "bn": self.bn_weight * self.statistics.loss(self.first_bn_multiplier)}
        tv_l1, tv_l2 = total_variation(view)
        if self.tv_l1:
            parts["tv_l1"] = self.tv_l1 * tv_l1
        if self.tv_l2:
            parts["tv_l2"] = self.tv_l2 * tv_l2
        if self.l2:
            parts["l2"] = self.l2 * input_l2(view)
        if self.adi_weight and student is not None:
            parts["adi"] = self.adi_weight * adi_competition(student(view), teacher_logits, self.adi_temperature)
        return parts

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.get_state(), "rounds": self.rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
        self.rounds = int(state["rounds"])
