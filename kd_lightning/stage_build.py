"""A stage's scheme built from the run config: its networks, terms, teachers and the run facts it takes.

`stage_config` applies a stage's overrides, seed and terms to the run's config; `build_stage_module` gives the
scheme's constructor whatever it accepts of the networks, the earlier stages' products (`teacher_arguments`)
and the data's facts (`CONTEXT`). Nothing here trains.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lightning.data.inputs import RoleInputs, attach_input
from kd_lightning.errors import ConfigError
from kd_lightning.models import check_input_size
from kd_lightning.schemes.base import DistillationModule, labeled_subset
from kd_lightning.stages import Stage
from kd_lightning.teacher_cache import OFF_SWITCH, cache_options

# Arguments every scheme may take from the run rather than from its config (see build_stage_module).
CONTEXT = ("terms", "example_input", "train_size", "train_targets", "max_epochs", "num_classes", "optimizer",
           "scheduler", "teacher_cache", "inputs", "labeled")


def construct(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, re-raising a constructor's ConfigError as itself rather than wrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise


def build_model(model_cfg: DictConfig, datamodule: Any, role: str = "student") -> torch.nn.Module:
    """A network of the model config, sized for the input it reads: `input` (set from `inputs.<role>`) names it;
    with named inputs a network that names none reads the data's default source. A model with a fixed input
    size (a ViT's img_size/patch_size) is checked against that input's size; `role` names the config node in
    the message."""
    if not OmegaConf.is_config(model_cfg):
        model_cfg = OmegaConf.create(model_cfg)
    name = model_cfg.get("input")
    if name is None and not datamodule.named_inputs:
        model = construct(model_cfg, num_classes=datamodule.num_classes, in_channels=datamodule.in_channels)
        image_size = getattr(datamodule, "image_size", None)
        if image_size is not None:
            check_input_size(model, tuple(image_size), role)
        return model
    model_cfg = copy.deepcopy(model_cfg)
    with open_dict(model_cfg):
        model_cfg.pop("input", None)
    name = str(name or datamodule.default_source)
    shape = datamodule.input_shape_of(name)
    model = construct(model_cfg, num_classes=datamodule.num_classes, in_channels=shape[0])
    if len(shape) == 3:
        check_input_size(model, tuple(shape[1:]), role)
    return attach_input(model, name)


def configure_inputs(cfg: DictConfig, datamodule: Any) -> RoleInputs:
    """The run's `inputs` config applied: the data serves the named inputs, and the teacher's and the student's
    model configs say what they read (so the stage cache keys on it and later stages build them alike)."""
    node = cfg.get("inputs") or {}
    roles = RoleInputs.from_config(node)
    datamodule.use_inputs(node.get("views"), roles)
    with open_dict(cfg):
        if roles.teacher is not None and cfg.get("teacher") is not None:
            cfg.teacher.model.input = roles.teacher
        if roles.student is not None and cfg.get("student") is not None:
            cfg.student.input = roles.student
    return roles


def labels_kept(stage_cfg: DictConfig, datamodule: Any) -> torch.Tensor | None:
    """Which training samples keep their label in this stage (`labeled_fraction` < 1), None when all do."""
    fraction = float(stage_cfg.get("labeled_fraction", 1.0))
    if fraction >= 1.0:
        return None
    return labeled_subset(datamodule.train_targets, fraction, int(getattr(datamodule, "seed", 0)))


def scheme_kwargs(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    return {"num_classes": datamodule.num_classes, "optimizer": instantiate(cfg.optimizer),
            "scheduler": instantiate(cfg.scheduler) if cfg.get("scheduler") else None}


def build_terms(cfg: DictConfig) -> dict[str, Any]:
    """The `distill` terms; a term config's `ce_weight` (its published recipe's CE weight) goes on the term."""
    terms = {}
    for name, term_cfg in (cfg.get("distill") or {}).items():
        options = OmegaConf.to_container(term_cfg, resolve=True)
        recipe_ce_weight = options.pop("ce_weight", None)
        # Rebuilt under its own key, so Hydra's errors still name `distill.<name>`.
        terms[name] = construct(OmegaConf.create({"distill": {name: options}}).distill[name])
        if recipe_ce_weight is not None:
            terms[name].recipe_ce_weight = float(recipe_ce_weight)
    return terms


def stage_config(cfg: DictConfig, stage: Stage) -> DictConfig:
    """The run's config as `stage` trains under it: its overrides, seed and terms applied.

    Set in the config, not only on the Trainer, so schedules that read them (cosine T_max) follow, the
    stage's loggers record what it trained with, and the cache key sees the effective recipe: a sweep over
    student epochs shares one teacher of fixed length.
    """
    stage_cfg = copy.deepcopy(cfg)
    with open_dict(stage_cfg):
        for key, value in stage.overrides.items():
            OmegaConf.update(stage_cfg, key, value, merge=False)
        stage_cfg.seed = stage.seed
        stage_cfg.distill = dict(stage.distill or {})
    return stage_cfg


def constructor_parameters(cls: type) -> set[str]:
    """Keyword names a scheme's constructor takes, following `**base` up to the class that stops forwarding."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
        names |= {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def build_stage_module(stage_cfg: DictConfig, stage: Stage, datamodule: Any,
                       teachers: dict[str, Any]) -> DistillationModule:
    """The stage's scheme with freshly initialised networks, its teachers, terms and the data's facts."""
    scheme_class = get_class(stage.scheme["_target_"])
    accepted = constructor_parameters(scheme_class)
    options = {key: value for key, value in stage.scheme.items() if key != "_target_"}
    if stage.distill and "terms" not in accepted:
        raise ConfigError(f"scheme {scheme_class.__name__} (stage {stage.name!r}) trains without a teacher, but "
                          f"distill={list(stage.distill)} asks for teacher knowledge. Add `distill=[]` to train without "
                          f"distillation, or choose a scheme that distils (scheme=offline).")
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"scheme {scheme_class.__name__} has no option {unknown} (stage {stage.name!r}). Its options: "
                          f"{sorted(accepted - set(stage.networks) - set(stage.teachers) - set(CONTEXT))}.")
    cache = cache_options(stage_cfg)
    if cache is not None and stage.teachers and "teacher_cache" not in accepted:
        raise ConfigError(f"scheme {scheme_class.__name__} (stage {stage.name!r}) cannot serve its teachers' outputs "
                          f"from the teacher cache. Train it with {OFF_SWITCH}.")
    labeled = labels_kept(stage_cfg, datamodule)
    if labeled is not None and "labeled" not in accepted:
        raise ConfigError(f"labeled_fraction={stage_cfg.labeled_fraction} hides most training labels, but scheme "
                          f"{scheme_class.__name__} (stage {stage.name!r}) trains on every label. Semi-supervised "
                          f"distillation runs with scheme=offline (and its teacher and baseline stages); set "
                          f"labeled_fraction=1 for this scheme.")
    role = "teacher" if stage.name.startswith("teacher") else "student"  # which config node holds its options
    networks = {arg: [build_model(m, datamodule, role) for m in value] if isinstance(value, (list, tuple))
                else build_model(value, datamodule, role) for arg, value in stage.networks.items()}
    context = {"terms": build_terms(stage_cfg), "example_input": datamodule.example_input(),
               "inputs": RoleInputs.from_config(stage_cfg.get("inputs")), "labeled": labeled,
               "train_size": datamodule.train_size, "train_targets": datamodule.train_targets,
               "max_epochs": stage_cfg.trainer.max_epochs, "teacher_cache": cache if stage.teachers else None,
               **scheme_kwargs(stage_cfg, datamodule)}
    context = {key: value for key, value in context.items() if key in accepted}
    module = scheme_class(**networks, **teachers, **options, **context)
    if getattr(datamodule, "mixing", None) is not None and datamodule.mixing.active:
        check_mixing(module, datamodule, stage, labeled is not None, context.get("teacher_cache") is not None)
    return module


def check_mixing(module: DistillationModule, datamodule: Any, stage: Stage, hides_labels: bool,
                 caches_teacher: bool) -> None:
    """Refuse mixed training batches (data.mixup_alpha / data.cutmix_alpha) where they cannot train."""
    datamodule.check_mixing()
    module.check_mixed_batches()
    if hides_labels:
        raise ConfigError(f"labeled_fraction < 1 hides labels by sample (stage {stage.name!r}), but a mixed batch "
                          f"blends each sample's target with another's, so a hidden label would leak into a shown "
                          f"sample's target. Train semi-supervised runs unmixed (data.mixup_alpha=0 "
                          f"data.cutmix_alpha=0), or with labeled_fraction=1.")
    if caches_teacher:
        raise ConfigError(f"The teacher cache keys the teacher's outputs on (sample, view), but a mixed batch "
                          f"(data.mixup_alpha / data.cutmix_alpha) shows the teacher blends of two samples, which "
                          f"no key names (stage {stage.name!r}). Train with {OFF_SWITCH}, or unmixed.")


def teacher_arguments(stage: Stage, products: dict[str, dict[str, torch.nn.Module]],
                      teacher_input: str | None = None) -> dict[str, Any]:
    """The earlier stages' products this stage reads, by constructor argument. With `inputs.teacher` set, a product
    that teaches (argument `teacher`) reads that input: a Born-Again generation or a TAKD assistant trained on the
    student's input teaches from the teacher's (Noisy Student's clean teacher of a noised student)."""
    arguments = _teacher_products(stage, products)
    if teacher_input is not None and isinstance(arguments.get("teacher"), torch.nn.Module):
        attach_input(arguments["teacher"], teacher_input)
    return arguments


def _teacher_products(stage: Stage, products: dict[str, dict[str, torch.nn.Module]]) -> dict[str, Any]:
    def product(reference: str) -> torch.nn.Module:
        name, _, role = reference.partition(":")
        networks = products[name]
        if role:
            if role not in networks:
                raise ConfigError(f"Stage {name!r} has no product {role!r}; it trained {sorted(networks)}.")
            return networks[role]
        if len(networks) != 1:
            raise ConfigError(f"Stage {name!r} trained several networks {sorted(networks)}; name one as "
                              f"'{name}:<network>' where stage {stage.name!r} reads it.")
        return next(iter(networks.values()))

    return {arg: [product(ref) for ref in value] if isinstance(value, (list, tuple)) else product(value)
            for arg, value in stage.teachers.items()}
