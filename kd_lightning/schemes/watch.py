"""Stops a run at the first non-finite loss and names the loss that produced it."""

from __future__ import annotations

import torch
from typing import Mapping

from torch import Tensor

from kd_lightning.errors import ConfigError

NEVER = torch.iinfo(torch.int64).max


class NonFiniteWatch:
    """Per-loss first step at which a value was NaN/inf, kept on the device so recording never syncs.

    By the time a check runs, a NaN may have reached the weights and every loss; the earliest step
    tells which loss broke first.
    """

    def __init__(self, names: list[str], remedies: Mapping[str, str] | None = None) -> None:
        self.names = list(names)
        # What to lower for a loss whose setting is not `distill.<name>.weight` (a scheme's own losses).
        self.remedies = dict(remedies or {})
        self.first_step: dict[str, Tensor] = {}

    def record(self, name: str, value: Tensor, step: int) -> None:
        if name not in self.names:
            raise KeyError(f"NonFiniteWatch records {self.names}, not {name!r}")
        first = self.first_step.get(name)
        if first is None or first.device != value.device:
            first = torch.tensor(NEVER, dtype=torch.int64, device=value.device)
        finite = torch.isfinite(value.detach())
        # Three small ops per loss and step (a scalar loss needs no .all()): on a small network each op's dispatch
        # is a visible share of the step. Steps only grow, so the minimum keeps the first non-finite step.
        self.first_step[name] = torch.where(finite if finite.dim() == 0 else finite.all(), first,
                                            first.clamp(max=step))

    def raise_if_any(self) -> None:
        # Called where the loggers wait for the device anyway; after the first read, each is a copy of one number.
        steps = {name: int(step) for name, step in self.first_step.items()}
        broken = [(step, name) for name, step in steps.items() if step != NEVER]
        if broken:
            step, name = min(broken)
            lower = self.remedies.get(name) or remedy(name)
            raise ConfigError(
                f"Loss {name!r} became NaN or infinite at training step {step}; the run was stopped there. Lower "
                f"{lower}, check its inputs (taps, temperature), or train in trainer.precision=32-true if "
                f"it happened under 16-bit precision."
            )


def remedy(loss_name: str) -> str:
    if loss_name == "ce":
        return "scheme.ce_weight or the learning rate (optimizer.lr)"
    if loss_name.endswith("_init"):  # init-stage losses are unweighted; each term has its own constant rate
        term = loss_name[: -len("_init")]
        return f"the init stage's learning rate (distill.{term}.init_lr; null means optimizer.lr, unscheduled)"
    return f"its weight (distill.{loss_name}.weight) or the learning rate (optimizer.lr)"
