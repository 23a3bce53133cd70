"""The common numeric settings checked in one place before anything trains.

Without this, `trainer.max_epochs=abc` surfaces as a TypeError deep in Lightning and `optimizer.lr=-1` as a
torch traceback, after the teacher may already have trained. Patterns use `*` for any one key, so every
term under `distill.` is covered by name (weight, temperature, warm-up) without a list of terms here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import ConfigError


def is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_whole(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_batch_limit(value: Any) -> bool:
    # Lightning reads an int as a number of batches and a float as a fraction of the epoch.
    return value is None or is_whole(value, 0) or (isinstance(value, float) and 0.0 <= value <= 1.0)


def is_devices(value: Any) -> bool:
    if value == "auto" or value == -1 or is_whole(value, 1):
        return True
    if isinstance(value, str):
        return all(part.strip().isdigit() for part in value.split(",")) and value.strip(", ") != ""
    return isinstance(value, list) and bool(value) and all(is_whole(index, 0) for index in value)


@dataclass(frozen=True)
class Rule:
    patterns: tuple[str, ...]
    accepts: Callable[[Any], bool]
    requirement: str
    example: str
    optional: bool = False


RULES = (
    Rule(("trainer.max_epochs",), lambda v: is_whole(v, 1), "a whole number ≥ 1 (epochs to train)", "30"),
    Rule(("teacher.max_epochs",), lambda v: is_whole(v, 1), "a whole number ≥ 1 or null (= trainer.max_epochs)",
         "240", optional=True),
    Rule(("trainer.max_steps",), lambda v: v == -1 or is_whole(v, 1), "a whole number ≥ 1, or -1 for no limit", "-1"),
    Rule(("trainer.devices",), is_devices, "a whole number ≥ 1, -1 (all), 'auto' or a list of device indices", "1"),
    Rule(("trainer.num_nodes", "trainer.log_every_n_steps", "trainer.accumulate_grad_batches"),
         lambda v: is_whole(v, 1), "a whole number ≥ 1", "1"),
    Rule(("trainer.check_val_every_n_epoch",), lambda v: is_whole(v, 1), "a whole number ≥ 1 or null", "1",
         optional=True),
    Rule(("trainer.limit_*_batches", "trainer.overfit_batches"), is_batch_limit,
         "null (all), a whole number of batches ≥ 0, or a fraction between 0.0 and 1.0", "10"),
    Rule(("trainer.gradient_clip_val",), lambda v: is_real(v) and v >= 0, "a number ≥ 0 or null", "1.0",
         optional=True),
    Rule(("data.batch_size",), lambda v: is_whole(v, 1), "a whole number ≥ 1 (samples per step per device)", "64"),
    Rule(("data.num_workers",), lambda v: is_whole(v, 0), "a whole number ≥ 0 (0 loads in the main process)", "2"),
    Rule(("data.val_fraction",), lambda v: is_real(v) and 0 <= v < 1, "a fraction in [0, 1)", "0.1"),
    Rule(("optimizer.lr",), lambda v: is_real(v) and v > 0, "a number > 0", "0.05"),
    Rule(("teacher.lr",), lambda v: is_real(v) and v > 0, "a number > 0 or null (= optimizer.lr)", "0.05",
         optional=True),
    Rule(("optimizer.weight_decay",), lambda v: is_real(v) and v >= 0, "a number ≥ 0", "5.0e-4"),
    Rule(("optimizer.momentum", "optimizer.dampening"), lambda v: is_real(v) and 0 <= v < 1,
         "a number in [0, 1)", "0.9"),
    Rule(("optimizer.betas",),
         lambda v: isinstance(v, list) and len(v) == 2 and all(is_real(b) and 0 <= b < 1 for b in v),
         "two numbers in [0, 1)", "[0.9,0.999]"),
    Rule(("optimizer.eps",), lambda v: is_real(v) and v > 0, "a number > 0", "1.0e-8"),
    Rule(("scheduler.T_max",), lambda v: is_whole(v, 1), "a whole number ≥ 1 (epochs of the cosine)", "30"),
    Rule(("scheduler.gamma",), lambda v: is_real(v) and v > 0, "a number > 0", "0.1"),
    Rule(("scheduler.eta_min",), lambda v: is_real(v) and v >= 0, "a number ≥ 0", "0.0"),
    Rule(("scheduler.milestones",),
         lambda v: isinstance(v, list) and all(is_whole(m, 1) for m in v) and v == sorted(set(v)),
         "a strictly increasing list of epochs ≥ 1", "[150,180,210]"),
    # Before the *_weight rule: null leaves the term's class value (`recipe_ce_weight`) as the one source.
    Rule(("distill.*.ce_weight",), lambda v: is_real(v) and v >= 0,
         "a number ≥ 0 (the cross-entropy weight of the term's recipe), or null for the term's own", "1.0",
         optional=True),
    Rule(("distill.*.weight", "distill.*.*_weight", "distill.*.alpha", "distill.*.beta"),
         lambda v: is_real(v) and v >= 0, "a number ≥ 0 (the loss's weight)", "1.0"),
    Rule(("scheme.ce_weight",), lambda v: is_real(v) and v >= 0,
         "a number ≥ 0 (the cross-entropy's weight), or null for the terms' recipe value", "1.0", optional=True),
    Rule(("distill.*.init_lr",), lambda v: is_real(v) and v > 0,
         "a number > 0, or null for optimizer.lr (the init stage's constant learning rate)", "0.01", optional=True),
    Rule(("distill.*.temperature", "distill.*.nce_t"), lambda v: is_real(v) and v > 0,
         "a number > 0 (logits are divided by it)", "4.0"),
    Rule(("distill.*.warmup_epochs", "distill.*.init_epochs"), lambda v: is_whole(v, 0), "a whole number ≥ 0", "0"),
    Rule(("torch_threads",), lambda v: is_whole(v, 1), "a whole number ≥ 1 or null (torch's default)", "1",
         optional=True),
    Rule(("labeled_fraction",), lambda v: is_real(v) and 0 < v <= 1,
         "a fraction in (0, 1]: the share of training labels the student may read", "0.1", optional=True),
    Rule(("seed", "teacher.seed", "data.seed"), lambda v: is_whole(v, 0) and v < 2**32,
         "a whole number in [0, 2^32)", "0"),
)


def check_settings(cfg: DictConfig) -> None:
    """Raise one ConfigError naming every common setting whose value cannot work, before any training."""
    written = dict(leaves(OmegaConf.to_container(cfg, resolve=False)))
    bad: dict[str, tuple[Any, Rule]] = {}
    for key, value in leaves(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)):
        rule = next((rule for rule in RULES if any(fnmatchcase(key, pattern) for pattern in rule.patterns)), None)
        if rule is not None and not (value is None and rule.optional) and not rule.accepts(value):
            bad[key] = (value, rule)
    # scheduler.T_max: ${trainer.max_epochs} is wrong only because trainer.max_epochs is: name the source once.
    problems = [f"{key}={value!r} must be {rule.requirement}, e.g. {key}={rule.example}"
                for key, (value, rule) in bad.items()
                if not (isinstance(written.get(key), str) and written[key].strip("${}") in bad)]
    if problems:
        raise ConfigError(f"Invalid setting{'s' if len(problems) > 1 else ''}: {'; '.join(problems)}. Fix "
                          f"{'them' if len(problems) > 1 else 'it'} on the command line or in the config file "
                          f"that sets {'them' if len(problems) > 1 else 'it'} (`kd-train --cfg job` shows the "
                          f"composed values).")


def leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if not isinstance(node, dict):
        return [(prefix, node)]
    return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}{key}" if not prefix
                                                                   else f"{prefix}.{key}")]
