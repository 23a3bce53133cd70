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

from kd_lightning.data.inputs import RoleInputs
from kd_lightning.errors import ConfigError

SUPERVISED = "kd_lightning.schemes.Supervised"


@dataclass
class Stage:
    """One training (or loading) step of a run.

    `networks` maps a scheme constructor argument to a model config (or a list of them, e.g. peers);
    `teachers` maps a constructor argument to an earlier stage's name (or a list of names), read as that
    stage's trained product; `overrides` are dotted config keys set for this stage alone
    (`trainer.max_epochs`, `optimizer.lr`). A stage with `checkpoint` loads its network from that file and
    one with `pretrained` comes with trained weights: both are evaluated, not trained. A stage with `init_from`
    starts its `student` from that earlier stage's trained network (fine-tuning a pre-trained one); the source
    stage's key enters this stage's cache key as a teacher's does.
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
    init_from: str | None = None

    @property
    def trains(self) -> bool:
        return self.checkpoint is None and not self.pretrained

    def teacher_names(self) -> list[str]:
        """The earlier stages this one reads: its teachers, and the stage it starts from (`init_from`)."""
        names: list[str] = []
        for value in self.teachers.values():
            names.extend(value if isinstance(value, (list, tuple)) else [value])
        return names + ([self.init_from] if self.init_from else [])

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
    # A teacher learns its own modality from every label; `labeled_fraction` hides the student's (its baseline's).
    overrides: dict[str, Any] = {"labeled_fraction": 1.0} if float(cfg.get("labeled_fraction", 1.0)) < 1 else {}
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
TEACHER_KEYS = {"model", "name", "checkpoint", "max_epochs", "lr", "seed"}


def model_config(entry: Any, where: str) -> dict[str, Any]:
    """A model config from a zoo name or a model config mapping (`name` plus the factory's options)."""
    from kd_lightning.models import MODELS, TORCHVISION_PREFIX

    entry = _plain(entry)
    if not isinstance(entry, (str, Mapping)):
        raise ConfigError(f"{where}={entry!r} is not a model. Write each entry as a model name (e.g. resnet20) or a "
                          f"model config with a `name`.")
    model = {"_target_": MODEL_FACTORY, "name": entry} if isinstance(entry, str) else dict(entry)
    model.setdefault("_target_", MODEL_FACTORY)
    name = model.get("name")
    if model["_target_"] == MODEL_FACTORY and not (isinstance(name, str) and (
            name in MODELS or name.startswith(TORCHVISION_PREFIX))):
        raise ConfigError(f"{where}={entry!r} is not a model: {MODELS.unknown_message(str(name))} Write each entry as "
                          f"a model name (e.g. resnet20) or a model config with a `name`.")
    return model


def teacher_config(cfg: DictConfig, entry: Any, position: int, where: str) -> DictConfig:
    """A teacher node for `teacher_stage` from a list entry: a model name, or a mapping with `model` (or
    `name`) and any of checkpoint, max_epochs, lr, seed. What an entry leaves out comes from `cfg.teacher`,
    except the checkpoint (it belongs to cfg.teacher's own model) and the seed, which is teacher.seed +
    position, so that three entries of one architecture are three differently initialised teachers."""
    options = {"name": entry} if isinstance(entry, str) else dict(_plain(entry) or {})
    unknown = sorted(set(options) - TEACHER_KEYS)
    if unknown:
        raise ConfigError(f"{where}={entry!r} has keys {unknown} that a teacher does not take; a teacher entry is a "
                          f"model name or a mapping of {sorted(TEACHER_KEYS)}.")
    model = options.pop("model", None) or options.pop("name", None)
    options.pop("name", None)
    node = {"model": role_input(cfg, "teachers", position, model_config(model, where)), "checkpoint": None, "max_epochs": cfg.teacher.get("max_epochs"),
            "lr": cfg.teacher.get("lr"), "seed": int(cfg.teacher.seed) + position, **options}
    return OmegaConf.create(node)


def _entries(value: Any, where: str, minimum: int, meaning: str) -> list[Any]:
    entries = _plain(value)
    if isinstance(entries, (str, Mapping)) or entries is None:
        entries = [] if entries is None else [entries]
    if len(entries) < minimum:
        raise ConfigError(f"{where} has {len(entries)} entries ({entries}); {meaning}")
    return list(entries)


def multi_teacher_plan(cfg: DictConfig, teachers: Any = None) -> list[Stage]:
    """One cached (or loaded) teacher stage per entry of `teachers` → (baseline) → the student distilled from
    all of them at once (scheme MultiTeacher, which aggregates every term over the teachers)."""
    entries = _entries(teachers, "teachers", 2, "scheme=multi_teacher needs at least two, e.g. "
                       "teachers=[resnet32x4,wrn_40_2] (scheme=offline distils from one).")
    stages = [teacher_stage(cfg, name=f"teacher{k}", label=f"teacher {k}",
                            teacher=teacher_config(cfg, entry, k - 1, f"teachers[{k - 1}]"))
              for k, entry in enumerate(entries, start=1)]
    if cfg.get("baseline"):
        stages.append(baseline_stage(cfg))
    terms = _plain(cfg.get("distill")) or {}
    stages.append(Stage(name="student", label=f"student + {'+'.join(terms) or 'teachers'} ({len(entries)} teachers)",
                        scheme=_plain(cfg.scheme), networks={"student": _plain(cfg.student)},
                        teachers={"teachers": [stage.name for stage in stages if stage.name.startswith("teacher")]},
                        distill=terms, seed=int(cfg.seed)))
    return stages


def teacher_chain_plan(cfg: DictConfig, chain: Any = None) -> list[Stage]:
    """TAKD's chain, teacher → assistant(s) → student, as consecutive stages: each hop distils the next network
    from the previous stage's product with the run's scheme and terms. The first entry is a teacher entry
    (see `teacher_config`), the others models; assistants are cached like teachers, keyed by their recipe and
    their teacher's key; the last entry is the run's student.

    Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant" (AAAI 2020). The reference
    (imirzadeh/Teacher-Assistant-Knowledge-Distillation, train.py) trains each hop with (1−λ)·CE + λ·T²·KL
    where nn.KLDivLoss's default 'mean' also divides by the class count, and searched λ and T per pair
    (search_space.json); here a hop is the run's `distill` terms (default KD: CE 0.1 + 0.9·T²·KL, T=4,
    per-sample sum over classes), so its published weights apply and no class-count factor hides in λ.
    """
    entries = _entries(chain, "plan.chain", 2, "a chain is a teacher, any assistants and the student, e.g. "
                       "plan.chain=[resnet110,resnet20,resnet8].")
    stages = [teacher_stage(cfg, teacher=teacher_config(cfg, entries[0], 0, "plan.chain[0]"))]
    terms = _plain(cfg.get("distill")) or {}
    method = "+".join(terms) or "teacher"
    for k, entry in enumerate(entries[1:-1], start=1):
        stages.append(Stage(name=f"assistant{k}", label=f"assistant {k} + {method}", scheme=_plain(cfg.scheme),
                            networks={"student": model_config(entry, f"plan.chain[{k}]")},
                            teachers={"teacher": stages[-1].name}, distill=terms, seed=int(cfg.seed), cache=True))
    student = model_config(entries[-1], f"plan.chain[{len(entries) - 1}]")
    taught_by = stages[-1].name
    if cfg.get("baseline"):
        stages.append(baseline_stage(cfg, model=student))
    stages.append(Stage(name="student", label=f"student + {method} via {len(entries) - 2} assistant(s)",
                        scheme=_plain(cfg.scheme), networks={"student": student}, teachers={"teacher": taught_by},
                        distill=terms, seed=int(cfg.seed)))
    return stages


def born_again_plan(cfg: DictConfig, generations: int = 3) -> list[Stage]:
    """Born-Again Networks: generation 0 is `cfg.student` trained on labels alone (the baseline stage), and
    each generation k = 1..`generations` is the same architecture, freshly initialised (seed + k), distilled
    from generation k − 1 with the run's terms. Every generation but the last is cached; the last is the
    run's student.

    Furlanello et al., "Born Again Neural Networks" (ICML 2018). No official code; the unofficial ones
    (nocotan/born_again_neuralnet, KD_Lib BANN) use KD with α=0.9 and nn.KLDivLoss's default 'mean', which
    divides the KD term by the class count as well; here each generation uses the run's `distill` terms
    (default KD, batch-mean KL summed over classes).
    """
    if int(generations) < 1:
        raise ConfigError(f"plan.generations={generations}: Born-Again training needs at least one generation "
                          f"after the label-trained generation 0, e.g. plan.generations=3.")
    terms = _plain(cfg.get("distill")) or {}
    stages = [baseline_stage(cfg, label="generation 0 (labels)")]
    for k in range(1, int(generations) + 1):
        last = k == int(generations)
        stages.append(Stage(name="student" if last else f"generation{k}",
                            label=f"generation {k} + {'+'.join(terms) or 'teacher'}", scheme=_plain(cfg.scheme),
                            networks={"student": _plain(cfg.student)}, teachers={"teacher": stages[-1].name},
                            distill=terms, seed=int(cfg.seed) + k, cache=not last))
    return stages


def label_smoothing_stage(cfg: DictConfig, smoothing: float) -> Stage:
    """The student trained with label-smoothed cross-entropy: the baseline every self-distillation table needs
    (a neutral re-run puts it above BYOT, CS-KD and Tf-KD, winycg/Self-KD-Lib). Cached like the baseline."""
    return Stage(name="label_smoothing", label=f"student + label smoothing {smoothing:g}",
                 scheme={"_target_": SUPERVISED, "label_smoothing": float(smoothing)},
                 networks={"student": _plain(cfg.student)}, seed=int(cfg.seed), cache=True)


def _comparison_stages(cfg: DictConfig, label_smoothing: float | None) -> list[Stage]:
    stages = [baseline_stage(cfg)] if cfg.get("baseline") else []
    if label_smoothing:
        if not 0.0 < float(label_smoothing) < 1.0:
            raise ConfigError(f"plan.label_smoothing={label_smoothing} must be in (0, 1) (Tf-KD and Self-KD-Lib "
                              f"compare with 0.1), or null to leave the label-smoothing baseline out.")
        stages.append(label_smoothing_stage(cfg, float(label_smoothing)))
    return stages


def self_distillation_plan(cfg: DictConfig, label_smoothing: float | None = 0.1) -> list[Stage]:
    """(baseline) → (label-smoothing baseline) → the student trained by a scheme that is its own teacher."""
    terms = _plain(cfg.get("distill")) or {}
    name = str(cfg.scheme["_target_"]).rsplit(".", 1)[-1]
    return [*_comparison_stages(cfg, label_smoothing),
            Stage(name="student", label=f"student + {'+'.join([name, *terms])}", scheme=_plain(cfg.scheme),
                  networks={"student": _plain(cfg.student)}, distill=terms, seed=int(cfg.seed))]


def cs_kd_plan(cfg: DictConfig, label_smoothing: float | None = 0.1) -> list[Stage]:
    """`self_distillation_plan`, refusing before anything trains a batch size that cannot hold class pairs."""
    from kd_lightning.data.pairs import check_pair_batch_size

    check_pair_batch_size(cfg.data.batch_size)
    return self_distillation_plan(cfg, label_smoothing)


def tf_kd_self_plan(cfg: DictConfig, label_smoothing: float | None = 0.1) -> list[Stage]:
    """Tf-KD_self: a teacher of the student's own architecture trained first (seed `teacher.seed`, cached, or
    `teacher.checkpoint`), then (baseline), (label smoothing), and the student distilled from it offline."""
    own_architecture = OmegaConf.create({**_plain(cfg.teacher), "model": _plain(cfg.student)})
    self_teacher = teacher_stage(cfg, label="self-teacher", teacher=own_architecture)
    terms = _plain(cfg.get("distill")) or {}
    return [self_teacher, *_comparison_stages(cfg, label_smoothing),
            Stage(name="student", label=f"student + self-teacher {'+'.join(terms)}", scheme=_plain(cfg.scheme),
                  networks={"student": _plain(cfg.student)}, teachers={"teacher": "teacher"}, distill=terms,
                  seed=int(cfg.seed))]


def role_input(cfg: DictConfig, role: str, position: int, model: dict[str, Any]) -> dict[str, Any]:
    """`model` reading `inputs.<role>[position]` (one per teacher or peer) when the run names one."""
    roles = RoleInputs.from_config(cfg.get("inputs"))
    names = getattr(roles, role)
    if names is None and role == "teachers" and roles.teacher is not None:
        names = (roles.teacher,)  # one input for every teacher
    if names is None:
        return model
    if len(names) > 1 and position >= len(names):
        raise ConfigError(f"inputs.{role} names {len(names)} inputs {list(names)}, but there is a {role[:-1]} at "
                          f"position {position}. Name one input per {role[:-1]}, or one for all.")
    return {**model, "input": names[position] if len(names) > 1 else names[0]}


def baseline_input(cfg: DictConfig, model: dict[str, Any]) -> dict[str, Any]:
    """`model` as its baseline trains it: on the source of the view it reads (KDCL's per-peer distortions are
    draws of one augmentation, so the peers of one architecture share one baseline; a peer on another modality
    gets its own)."""
    name = model.get("input")
    views = (cfg.get("inputs") or {}).get("views") or {}
    if name is None or name not in views:
        return model
    source = (views[name] or {}).get("source")
    alone = {key: value for key, value in model.items() if key != "input"}
    return alone if source is None else {**alone, "input": source}


def supervision_transfer_plan(cfg: DictConfig) -> list[Stage]:
    """teacher → (baseline) → transfer → student: Gupta, Hoffman & Malik's supervision transfer as the paper uses
    it, pre-training then fine-tuning. The transfer stage trains the student's features to regress the
    teacher's on paired data without labels (`cfg.scheme`, CE weight 0, the run's `distill`); the student stage
    starts from that network and fine-tunes all of it on the labels (CE alone; with `labeled_fraction` < 1, on
    the labeled share only, which is the paper's setting)."""
    stages = [teacher_stage(cfg)]
    if cfg.get("baseline"):
        stages.append(baseline_stage(cfg))
    terms = _plain(cfg.get("distill")) or {}
    stages.append(Stage(name="transfer", label=f"student + {'+'.join(terms)} (no labels)", scheme=_plain(cfg.scheme),
                        networks={"student": _plain(cfg.student)}, teachers={"teacher": "teacher"}, distill=terms,
                        seed=int(cfg.seed)))
    stages.append(Stage(name="student", label="student: transfer, then fine-tuned", scheme={"_target_": SUPERVISED},
                        networks={"student": _plain(cfg.student)}, init_from="transfer", seed=int(cfg.seed)))
    return stages


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
    peers = [role_input(cfg, "peers", index, peer) for index, peer in enumerate(peers)]
    stages: list[Stage] = []
    if cfg.get("baseline"):
        alone = [baseline_input(cfg, peer) for peer in peers]
        distinct = list({json.dumps(peer, sort_keys=True): peer for peer in alone}.values())
        for index, peer in enumerate(distinct):
            name = "baseline" if len(distinct) == 1 else f"baseline_{index + 1}_{peer['name']}".replace(":", "_")
            stages.append(baseline_stage(cfg, peer, name=name, label=f"{peer['name']} alone"))
    method = scheme["_target_"].rsplit(".", 1)[-1]
    stages.append(Stage(name="peers", label=f"{method} peers", scheme=scheme, networks={"peers": peers},
                        distill=_plain(cfg.get("distill")) or {}, seed=int(cfg.seed)))
    return stages
