"""A run is an ordered list of stages; a plan turns the config into that list.

A stage is one scheme (a LightningModule) plus the networks it trains and the trained networks of earlier
stages it reads as teachers. `pipeline.run` executes the list the same way whatever the scheme: a stage
whose product is cached under the hash of its full recipe is loaded instead of trained, so every job of a
sweep trains each teacher, assistant or generation once. Plans are plain functions of the config, chosen
by the `plan` node that each `conf/scheme/*.yaml` sets (`plan._target_` names the function, its other
keys are the function's options).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import ConfigError

SUPERVISED = "kd_lightning.schemes.Supervised"


@dataclass
class Stage:
    """One training (or loading) step of a run.

    `networks` maps a scheme constructor argument to a model config (or a list of them, e.g. peers);
    `teachers` maps a constructor argument to an earlier stage's name (or a list of names), read as that
    stage's trained product; `overrides` are dotted config keys set for this stage alone
    (`trainer.max_epochs`, `optimizer.lr`). A stage with `checkpoint` loads its network from that file and
    one with `pretrained` comes with trained weights: both are evaluated, not trained.
    """

    name: str
    label: str
    scheme: Mapping[str, Any]
    networks: Mapping[str, Any]
    teachers: Mapping[str, Any] = field(default_factory=dict)
    distill: Mapping[str, Any] | None = None
    seed: int = 0
    overrides: Mapping[str, Any] = field(default_factory=dict)
    cache: bool = False
    checkpoint: str | None = None
    pretrained: bool = False

    @property
    def trains(self) -> bool:
        return self.checkpoint is None and not self.pretrained

    def teacher_names(self) -> list[str]:
        names: list[str] = []
        for value in self.teachers.values():
            names.extend(value if isinstance(value, (list, tuple)) else [value])
        return names

    def model_names(self) -> str:
        names = []
        for value in self.networks.values():
            for model in value if isinstance(value, (list, tuple)) else [value]:
                names.append(str(model.get("name")))
        return ", ".join(names)


def plan_stages(cfg: DictConfig) -> list[Stage]:
    """The run's stages, from `cfg.plan` (default: the offline plan), checked for consistency."""
    plan_cfg = cfg.get("plan") or {"_target_": "kd_lightning.stages.offline_plan"}
    options = {key: value for key, value in plan_cfg.items() if key != "_target_"}
    try:
        plan: Callable[..., list[Stage]] = get_method(plan_cfg["_target_"])
    except Exception as error:
        raise ConfigError(f"plan._target_={plan_cfg['_target_']!r} is not a function kd_lightning can import "
                          f"({error}). Use one of the plans in kd_lightning.stages, e.g. offline_plan.") from None
    stages = plan(cfg, **options)
    check_stages(stages)
    return stages


def check_stages(stages: list[Stage]) -> None:
    seen: set[str] = set()
    for stage in stages:
        if stage.name in seen:
            raise ConfigError(f"Two stages are named {stage.name!r}; stage names must be unique within a run "
                              f"(they name the phase directories and the rows of the closing table).")
        missing = [name for name in stage.teacher_names() if name not in seen]
        if missing:
            raise ConfigError(f"Stage {stage.name!r} reads {missing} as teachers, but no earlier stage has that "
                              f"name (earlier stages: {sorted(seen) or 'none'}). A stage can only learn from a stage "
                              f"before it in the list.")
        seen.add(stage.name)
    if not stages:
        raise ConfigError("The plan produced no stages; a run needs at least one network to train.")


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def teacher_stage(cfg: DictConfig, name: str = "teacher", label: str = "teacher",
                  teacher: DictConfig | None = None) -> Stage:
    """A teacher config node (default `cfg.teacher`: model, checkpoint, max_epochs, lr, seed) as a stage:
    loaded from its checkpoint or torchvision weights, or trained and cached with the run's recipe and the
    teacher's own seed, epochs and learning rate."""
    teacher = cfg.teacher if teacher is None else teacher
    overrides: dict[str, Any] = {}
    if teacher.get("max_epochs") is not None:
        overrides["trainer.max_epochs"] = teacher.max_epochs
    if teacher.get("lr") is not None:  # e.g. RepDistiller trains teachers at 0.05 for lr-0.01 students
        overrides["optimizer.lr"] = teacher.lr
    return Stage(name=name, label=label, scheme={"_target_": SUPERVISED}, networks={"student": _plain(teacher.model)},
                 seed=int(teacher.seed), overrides=overrides, cache=True, checkpoint=teacher.get("checkpoint"),
                 pretrained=bool(teacher.model.get("weights")))


def baseline_stage(cfg: DictConfig, model: Mapping[str, Any] | None = None, name: str = "baseline",
                   label: str = "student baseline") -> Stage:
    """The student (or `model`) trained alone with the run's seed and recipe. Cached: every method of a
    sweep over the same network and seed compares with one baseline."""
    return Stage(name=name, label=label, scheme={"_target_": SUPERVISED},
                 networks={"student": dict(model) if model is not None else _plain(cfg.student)},
                 seed=int(cfg.seed), cache=True)


def offline_plan(cfg: DictConfig) -> list[Stage]:
    """teacher → (baseline) → student distilled from the frozen teacher with `cfg.distill`."""
    terms = _plain(cfg.get("distill")) or {}
    stages = [teacher_stage(cfg)]
    if cfg.get("baseline"):
        stages.append(baseline_stage(cfg))
    stages.append(Stage(name="student", label=f"student + {'+'.join(terms) or 'teacher'}", scheme=_plain(cfg.scheme),
                        networks={"student": _plain(cfg.student)}, teachers={"teacher": "teacher"}, distill=terms,
                        seed=int(cfg.seed)))
    return stages


def supervised_plan(cfg: DictConfig) -> list[Stage]:
    """One network trained with cross-entropy: no teacher, no baseline."""
    return [Stage(name="student", label="supervised", scheme=_plain(cfg.scheme), networks={"student": _plain(cfg.student)},
                  distill=_plain(cfg.get("distill")) or None, seed=int(cfg.seed))]


MODEL_FACTORY = "kd_lightning.models.build_model"


def online_plan(cfg: DictConfig) -> list[Stage]:
    """(baselines: each distinct peer trained alone) → the peers trained together by `cfg.scheme`.

    `scheme.peers` lists model names or configs; null means two copies of `student`. The baselines share
    the stage cache with every other run of the same network, seed and recipe.
    """
    scheme = dict(_plain(cfg.scheme))
    peers_cfg = scheme.pop("peers", None)
    if peers_cfg is not None and not isinstance(peers_cfg, (list, tuple)):
        peers_cfg = [peers_cfg]
    peers = [model_config(peer, f"scheme.peers[{index}]") for index, peer in enumerate(peers_cfg)] if peers_cfg is not None else [_plain(cfg.student)] * 2
    stages: list[Stage] = []
    if cfg.get("baseline"):
        distinct = list({json.dumps(peer, sort_keys=True): peer for peer in peers}.values())
        for index, peer in enumerate(distinct):
            name = "baseline" if len(distinct) == 1 else f"baseline_{index + 1}_{peer['name']}".replace(":", "_")
            stages.append(baseline_stage(cfg, peer, name=name, label=f"{peer['name']} alone"))
    method = scheme["_target_"].rsplit(".", 1)[-1]
    stages.append(Stage(name="peers", label=f"{method} peers", scheme=scheme, networks={"peers": peers},
                        distill=_plain(cfg.get("distill")) or {}, seed=int(cfg.seed)))
    return stages
