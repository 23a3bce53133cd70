"""Fast-Datafree (Fang et al., AAAI 2022, "Up to 100× Faster Data-free Knowledge Distillation"): a meta
generator, copied for each batch and fine-tuned for a few steps with its own latent codes; the meta
weights then move by a first-order MAML or Reptile update, so later batches start from a better point."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.synthesis.augment import crop_flip
from kd_lightning.synthesis.deep_inversion import keep_best, synthesis_mode
from kd_lightning.synthesis.losses import BatchNormStatistics, agreement_adversarial

META_UPDATES = ("fomaml", "reptile")
# fast_meta.py's `reptile_grad`: the meta gradient is 67·(θ_meta − θ_fast).
REPTILE_SCALE = 67.0
# fast_meta.py re-initialises the generator's input layers at its round `120 + warmup` (1-based) under
# `--reset_l0 1`, which every scripts/fast_cifar.sh run passes.
RESET_L0_ROUND_AFTER_WARMUP = 120


def reset_input_layers(generator: nn.Module, rng: torch.Generator) -> None:
    """fast_meta.py `reset_l0`: weights ~ N(0, 0.02²) and zero biases for the generator's first Linear and
    first BatchNorm (the reference's `l1.0` and `conv_blocks.0`; here `project` and `bn0`). Drawn from `rng`
    on the host, so a resumed run re-initialises them as the uninterrupted one did."""
    linear = next((m for m in generator.modules() if isinstance(m, nn.Linear)), None)
    norm = next((m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine),
                None)
    with torch.no_grad():
        for module in (linear, norm):
            if module is None:
                continue
            module.weight.copy_(torch.randn(module.weight.shape, generator=rng) * 0.02)
            if module.bias is not None:
                module.bias.zero_()


class FastMetaSynthesizer:
    """One `synthesize` call = one batch of `batch_size` images from `steps` fast steps.

    Each fast step (fast_meta.py): x = normalise(G'(z)), loss = bn_weight·R_BN(momentum) + ce_weight·CE(T(x̃), y)
    + adv_weight·adv(S, T) on the crop/flip view x̃, the adversarial term from the last of `warmup_rounds`
    rounds on (the reference increments its `ep` before the `ep >= warmup` test); Adam (betas 0.5, 0.999)
    on G' at `lr_generator` and on z at `lr_latent`. The batch kept is the lowest-loss step's G'(z). With
    `reset_l0` the meta generator's input layers are re-initialised before round 120 + `warmup_rounds`
    (1-based), as the reference's `--reset_l0 1`. Meta update: "fomaml" sums the fast gradients of every step into the
    meta generator's gradient; "reptile" uses 67·(θ − θ'); both step a meta Adam at lr_generator·steps.
    Generator output must be pixels in [0, 1] (a Sigmoid head); `mean`/`std` normalise it for the teacher.
    Defaults: scripts/fast_cifar.sh (Fast-2: 2 steps, lr_g 5e-3, lr_z 0.015, bn 10, oh 0.5, adv 1.33,
    bn_mmt 0.9, warmup 20, first-order MAML, reset_l0 1).
    """

    def __init__(self, teacher: nn.Module, generator: nn.Module, num_classes: int, latent_dim: int,
                 batch_size: int = 256, steps: int = 2, lr_generator: float = 5e-3, lr_latent: float = 0.015,
                 bn_weight: float = 10.0, ce_weight: float = 0.5, adv_weight: float = 1.33,
                 bn_momentum: float = 0.9, warmup_rounds: int = 20, meta_update: str = "fomaml",
                 reset_l0: bool = True, crop_padding: int = 4, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 seed: int = 0) -> None:
        for name, value in (("batch_size", batch_size), ("steps", steps), ("latent_dim", latent_dim)):
            if int(value) <= 0:
                raise ConfigError(f"Fast-Datafree's {name} must be a positive integer, got {value}.")
        if meta_update not in META_UPDATES:
            raise ConfigError(f"Fast-Datafree's meta_update must be one of {META_UPDATES}, got {meta_update!r}.")
        self.teacher, self.generator = teacher, generator
        self.statistics = BatchNormStatistics(teacher, momentum=bn_momentum, scheme="Fast-Datafree")
        self.num_classes, self.latent_dim = int(num_classes), int(latent_dim)
        self.batch_size, self.steps = int(batch_size), int(steps)
        self.lr_generator, self.lr_latent = float(lr_generator), float(lr_latent)
        self.bn_weight, self.ce_weight, self.adv_weight = bn_weight, ce_weight, adv_weight
        self.warmup_rounds, self.meta_update, self.crop_padding = int(warmup_rounds), meta_update, int(crop_padding)
        self.reset_l0 = bool(reset_l0)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.meta_optimizer = torch.optim.Adam(generator.parameters(), lr=self.lr_generator * self.steps,
                                               betas=(0.5, 0.999))
        self.rng = torch.Generator().manual_seed(int(seed))
        self.rounds = 0

    def _normalise(self, pixels: Tensor) -> Tensor:
        if self.mean is None or self.std is None:
            return pixels
        return (pixels - self.mean.to(pixels)) / self.std.to(pixels)

    def synthesize(self, student: nn.Module | None = None, meta_optimizer: torch.optim.Optimizer | None = None
                   ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(normalised images, labels, last-step loss parts); `student` feeds the adversarial term. A scheme
        passes its own (checkpointed) optimizer over the generator as `meta_optimizer`; else the synthesizer's."""
        round_number = self.rounds + 1  # the reference's `ep`, incremented before it is read
        if self.reset_l0 and round_number == RESET_L0_ROUND_AFTER_WARMUP + self.warmup_rounds:
            reset_input_layers(self.generator, self.rng)
        adversarial = bool(self.adv_weight) and student is not None and round_number >= self.warmup_rounds
        device = next(self.generator.parameters()).device
        latent = torch.randn((self.batch_size, self.latent_dim), generator=self.rng).to(device).requires_grad_()
        labels = torch.randint(self.num_classes, (self.batch_size,), generator=self.rng).to(device)
        fast = self._fast_copy()
        fast_parameters = list(fast.parameters())
        optimizer = torch.optim.Adam([{"params": fast_parameters}, {"params": [latent], "lr": self.lr_latent}],
                                     lr=self.lr_generator, betas=(0.5, 0.999))
        meta_gradients = [torch.zeros_like(p) for p in fast_parameters]
        best: tuple[Tensor, Tensor] | None = None
        parts: dict[str, Tensor] = {}
        with synthesis_mode(self.teacher, student if adversarial else None), self.statistics:
            for _ in range(self.steps):
                images = self._normalise(fast(latent))
                view = crop_flip(images, self.crop_padding, self.rng)
                parts = self._loss_parts(view, labels, student if adversarial else None)
                loss = sum(parts.values())
                best = keep_best(best, loss, images)
                gradients = torch.autograd.grad(loss, fast_parameters + [latent])
                for parameter, gradient in zip(fast_parameters + [latent], gradients):
                    parameter.grad = gradient
                for total, gradient in zip(meta_gradients, gradients[:len(fast_parameters)]):
                    total.add_(gradient)
                optimizer.step()
        self.statistics.end_round()
        self._meta_step(fast, meta_gradients, meta_optimizer or self.meta_optimizer)
        self.rounds += 1
        assert best is not None
        return best[1], labels, {name: value.detach() for name, value in parts.items()}

    def _fast_copy(self) -> nn.Module:
        """The round's fast generator: a copy of the meta generator (weights and BN buffers), in train mode."""
        return copy.deepcopy(self.generator).train()

    def _meta_step(self, fast: nn.Module, meta_gradients: list[Tensor], optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for parameter, fast_parameter, total in zip(self.generator.parameters(), fast.parameters(), meta_gradients):
                parameter.grad = (total if self.meta_update == "fomaml"
                                  else REPTILE_SCALE * (parameter - fast_parameter))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # The fast copy's BN layers tracked the batch's statistics; the meta generator's keep theirs
        # (the reference clones from the meta state every round and never copies buffers back).

    def _loss_parts(self, view: Tensor, labels: Tensor, student: nn.Module | None) -> dict[str, Tensor]:
        teacher_logits = self.teacher(view)
        parts = {"bn": self.bn_weight * self.statistics.loss(),
                 "ce": self.ce_weight * F.cross_entropy(teacher_logits.float(), labels)}
        if student is not None:
            parts["adv"] = self.adv_weight * agreement_adversarial(student(view), teacher_logits)
        return parts

    def state_dict(self) -> dict[str, Any]:
        """Everything but the generator's weights, which live in the module that owns the generator."""
        return {"rng": self.rng.get_state(), "rounds": self.rounds, "meta_optimizer": self.meta_optimizer.state_dict(),
                "bn_statistics": self.statistics.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.set_state(state["rng"])
        self.rounds = int(state["rounds"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.statistics.load_state_dict(state["bn_statistics"])
