"""The main job: run the plan's stages in order (by default teacher, baseline, distilled student), report.

Each stage (and an init phase of its terms) gets its own Trainer and its own loggers, named after it, so a
W&B run, a CSV log and a checkpoint directory each hold exactly one training. Everything is built from
the Hydra config; `kd_lightning.stages` turns it into the list of stages.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lightning.acceleration import accelerate
from kd_lightning.checkpoint_selection import check_test_weights, restore_best, weight_choice_recipe
from kd_lightning.errors import ConfigError
from kd_lightning.job_identity import job_record, sweep_name
from kd_lightning.report import format_table, network_size, stage_warning
from kd_lightning.schemes import Supervised
from kd_lightning.schemes.base import DistillationModule
from kd_lightning.stages import Stage, plan_stages
from kd_lightning.teacher_cache import OFF_SWITCH, cache_options
from kd_lightning.teachers import (CHECKPOINT_KEY, export_student, load_products, load_weights, read_metrics,
                                   recipe_key, save_products)
from kd_lightning.validate import check_settings

log = logging.getLogger(__name__)

GPU_ACCELERATORS = {"gpu", "cuda"}


def check_accelerator(trainer_cfg: DictConfig) -> None:
    if str(trainer_cfg.get("accelerator", "cpu")) in GPU_ACCELERATORS and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={trainer_cfg.accelerator} asks for a CUDA GPU, but torch sees none on this "
            f"machine (torch {torch.__version__}, CUDA available: False). Run with trainer=cpu, or install a CUDA "
            f"build of torch on a machine with an NVIDIA GPU."
        )


def construct(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, re-raising a constructor's ConfigError as itself rather than wrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise


def build_model(model_cfg: DictConfig, datamodule: Any) -> torch.nn.Module:
    return construct(model_cfg, num_classes=datamodule.num_classes, in_channels=datamodule.in_channels)


def build_loggers(cfg: DictConfig, phase: str, ckpt_path: str | None = None) -> list:
    loggers = []
    for key, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None:
            continue
        target = str(logger_cfg.get("_target_", ""))
        overrides: dict[str, Any] = {}
        if target.endswith("WandbLogger"):
            run_name = logger_cfg.get("name") or f"{cfg.get('task_name', 'train')}/{Path(cfg.paths.output_dir).name}"
            # A sweep's runs share one group (the sweep's), so W&B compares its jobs side by side.
            group = logger_cfg.get("group") or sweep_name() or run_name
            overrides = {"name": f"{run_name}-{phase}", "group": group, "job_type": phase}
            if ckpt_path and not logger_cfg.get("id") and (run_id := resumed_wandb_run_id(ckpt_path)):
                overrides["id"] = run_id  # the resumed training continues its W&B run instead of starting one
        elif "name" in logger_cfg or target.endswith(("CSVLogger", "TensorBoardLogger")):
            overrides = {"name": f"{logger_cfg.get('name') or key}/{phase}"}
        loggers.append(instantiate(logger_cfg, **overrides))
    return loggers


def resumed_wandb_run_id(ckpt_path: str) -> str | None:
    """The W&B run id recorded in the checkpoint being resumed (see DistillationModule.on_save_checkpoint)."""
    return checkpoint_record(ckpt_path).get("wandb_run_id")


def checkpoint_record(ckpt_path: str) -> dict[str, Any]:
    """What a kd_lightning scheme recorded in its checkpoint (stage, W&B run id, RNG states)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    return dict(checkpoint.get(CHECKPOINT_KEY, {}))


def build_callbacks(cfg: DictConfig, has_logger: bool) -> list:
    callbacks = []
    for callback_cfg in (cfg.get("callbacks") or {}).values():
        if callback_cfg is None:
            continue
        target = str(callback_cfg.get("_target_", ""))
        if target.endswith("LearningRateMonitor") and not has_logger:
            continue  # it would refuse to run; with logger=none there is nothing to monitor into
        if target.endswith("ProgressBar") and cfg.trainer.get("enable_progress_bar") is False:
            continue  # the trainer refuses a progress bar callback when bars are switched off
        callbacks.append(instantiate(callback_cfg))
    return callbacks


def fit_and_test(cfg: DictConfig, module: L.LightningModule, datamodule: Any, phase: str,
                 max_epochs: int | None = None, test: bool = True,
                 ckpt_path: str | None = None) -> tuple[dict[str, float], L.Trainer]:
    loggers = build_loggers(cfg, phase, ckpt_path)
    trainer_overrides: dict[str, Any] = {"logger": loggers or False, "callbacks": build_callbacks(cfg, bool(loggers)),
                                         "default_root_dir": str(Path(cfg.paths.output_dir) / phase)}
    if max_epochs is not None:
        trainer_overrides["max_epochs"] = max_epochs
    trainer: L.Trainer = instantiate(cfg.trainer, **trainer_overrides)
    accelerate(module, trainer.strategy.root_device, cfg)
    if loggers:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    # Read before testing: `trainer.test` replaces the callback metrics, and `val/acc` is the search objective.
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/acc")}
    if test and cfg.get("test_weights", "last") == "best":  # not after an init phase: the main phase follows
        metrics.update(restore_best(trainer, module))
    if test and cfg.get("evaluate_test", True):
        trainer.test(module, datamodule=datamodule, verbose=False)
        metrics.update({key: float(value) for key, value in trainer.callback_metrics.items()
                        if key.startswith("test/")})
    _finish_wandb(loggers)
    return metrics, trainer


def _finish_wandb(loggers: list) -> None:
    # Sweeps run many jobs in one process: each W&B run must be closed before the next one opens.
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


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


def stage_recipe(stage_cfg: DictConfig, stage: Stage, teacher_keys: dict[str, str]) -> dict[str, Any]:
    """What decides a stage's trained weights (its cache key), including the keys of the stages it learns from."""
    trainer = OmegaConf.to_container(stage_cfg.trainer, resolve=True)
    for irrelevant in ("default_root_dir", "log_every_n_steps", "enable_progress_bar", "enable_model_summary",
                       "devices", "num_nodes", "strategy"):
        trainer.pop(irrelevant, None)
    data = OmegaConf.to_container(stage_cfg.data, resolve=True)
    for irrelevant in ("num_workers", "pin_memory", "root", "system_dir"):
        data.pop(irrelevant, None)
    scheduler = stage_cfg.get("scheduler")
    recipe = {"scheme": dict(stage.scheme), "networks": dict(stage.networks), "distill": dict(stage.distill or {}),
              "seed": stage.seed, "data": data, "trainer": trainer,
              "optimizer": OmegaConf.to_container(stage_cfg.optimizer, resolve=True),
              "scheduler": OmegaConf.to_container(scheduler, resolve=True) if scheduler else None,
              "teachers": {name: teacher_keys[name] for name in stage.teacher_names()},
              **weight_choice_recipe(stage_cfg)}
    cache = cache_options(stage_cfg)
    if stage.teachers and cache is not None and not cache.lossless:
        recipe["teacher_outputs"] = cache.dtype  # rounded teacher outputs train a (slightly) different network
    return recipe


def evaluate(cfg: DictConfig, model: torch.nn.Module, datamodule: Any, phase: str = "teacher") -> dict[str, float]:
    if not cfg.get("evaluate_test", True):
        return {}
    module = Supervised(model, **scheme_kwargs(cfg, datamodule))
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False,
                          default_root_dir=str(Path(cfg.paths.output_dir) / phase))
    trainer.test(module, datamodule=datamodule, verbose=False)
    return {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("test/")}


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
    networks = {arg: [build_model(m, datamodule) for m in value] if isinstance(value, (list, tuple))
                else build_model(value, datamodule) for arg, value in stage.networks.items()}
    context = {"terms": build_terms(stage_cfg), "example_input": datamodule.example_input(),
               "train_size": datamodule.train_size, "train_targets": datamodule.train_targets,
               "max_epochs": stage_cfg.trainer.max_epochs, "teacher_cache": cache if stage.teachers else None,
               **scheme_kwargs(stage_cfg, datamodule)}
    context = {key: value for key, value in context.items() if key in accepted}
    return scheme_class(**networks, **teachers, **options, **context)


# Arguments every scheme may take from the run rather than from its config (see build_stage_module).
CONTEXT = ("terms", "example_input", "train_size", "train_targets", "max_epochs", "num_classes", "optimizer",
           "scheduler", "teacher_cache")


def teacher_arguments(stage: Stage, products: dict[str, dict[str, torch.nn.Module]]) -> dict[str, Any]:
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


def stage_file(cfg: DictConfig, stage: Stage, key: str) -> Path:
    models = stage.model_names().replace(", ", "+").replace(":", "_")
    return Path(cfg.paths.cache_dir) / "stages" / f"{stage.name}-{models}-{key}.pt"


def run_stage(stage_cfg: DictConfig, stage: Stage, datamodule: Any, products: dict[str, dict[str, torch.nn.Module]],
              key: str, ckpt_path: str | None) -> tuple[dict[str, torch.nn.Module], dict[str, Any], L.Trainer | None]:
    """Train, load or evaluate one stage; returns (its products by role, its record for results, its trainer)."""
    teachers = teacher_arguments(stage, products)
    if not stage.trains:
        module = build_stage_module(stage_cfg, stage, datamodule, teachers)
        networks = module.products()
        if stage.checkpoint:
            for network in networks.values():
                load_weights(network, stage.checkpoint)
        network = next(iter(networks.values()))
        source = f"checkpoint {stage.checkpoint}" if stage.checkpoint else f"torchvision weights {network.kd_spec.get('weights')}"
        return networks, {"metrics": evaluate(stage_cfg, network, datamodule, stage.name), "source": source}, None
    cache_file = stage_file(stage_cfg, stage, key)
    if stage.cache and ckpt_path is None and cache_file.is_file():
        networks = build_stage_module(stage_cfg, stage, datamodule, teachers).products()
        load_products(networks, cache_file)
        metrics = read_metrics(cache_file)
        if len(networks) == 1 and not any(key.startswith("test/") for key in metrics):
            # Trained by a search trial, which tests nothing: a run that reports test metrics computes them now.
            metrics.update(evaluate(stage_cfg, next(iter(networks.values())), datamodule, stage.name))
        return networks, {"metrics": metrics, "source": f"cache {cache_file}"}, None
    L.seed_everything(stage.seed, workers=True)
    module = build_stage_module(stage_cfg, stage, datamodule, teachers)
    module.stage_name = stage.name
    if module.init_epochs:
        if ckpt_path is None:  # a resumed stage restores its initialised adapters from the checkpoint
            module.set_init_stage(True)
            fit_and_test(stage_cfg, module, datamodule, f"{stage.name}_init", max_epochs=module.init_epochs, test=False)
        # Also when resuming: the checkpoint's optimizer state covers the main stage's parameters only.
        module.set_init_stage(False)
    loss = module.loss_summary()
    metrics, trainer = fit_and_test(stage_cfg, module, datamodule, stage.name, ckpt_path=ckpt_path)
    source = "trained"
    if stage.cache:
        if trainer.is_global_zero:
            save_products(module.products(), cache_file, metrics)
        trainer.strategy.barrier(f"cache-{stage.name}")
        source = f"trained, cached at {cache_file}"
    return module.products(), {"metrics": metrics, "source": source, "loss": loss}, trainer


def table_rows(stage: Stage, record: dict[str, Any], networks: dict[str, torch.nn.Module]) -> list[tuple]:
    """One row per stage, or one per product when the scheme logs each product's `test/<role>/…` metrics."""
    metrics, sizes = record["metrics"], record["size"]
    if len(networks) > 1 and all(f"test/{role}/acc" in metrics for role in networks):
        return [(f"{record['label']} ({role})", network.kd_spec.get("name", role),
                 {key.replace(f"/{role}/", "/"): value for key, value in metrics.items() if f"/{role}/" in key},
                 sizes[role])
                for role, network in networks.items()]
    first = next(iter(networks))  # a single network, or the one whose metrics the stage logs as its own
    return [(record["label"], stage.model_names(), metrics, sizes[first])]


def resumed_stage(cfg: DictConfig, stages: list[Stage]) -> str | None:
    """The stage `ckpt_path` belongs to (recorded in the checkpoint; the last stage for older checkpoints)."""
    if not cfg.get("ckpt_path"):
        return None
    if not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is not a file. Point it at a checkpoint of the stage to resume, "
                          f"e.g. <output_dir>/student/checkpoints/last.ckpt, or drop ckpt_path to start afresh.")
    name = checkpoint_record(cfg.ckpt_path).get("stage") or stages[-1].name
    if name not in [stage.name for stage in stages]:
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} was saved by stage {name!r}, which this run does not have "
                          f"(its stages: {[stage.name for stage in stages]}). Resume it with the config it was "
                          f"trained with.")
    return name


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured stages and return their results (also written to `<output_dir>/results.json`)."""
    check_settings(cfg)
    if cfg.get("torch_threads"):
        torch.set_num_threads(cfg.torch_threads)  # this job's share of the cores under a parallel launcher
    check_accelerator(cfg.trainer)
    job = job_record(cfg)  # before the stages: they must not change what identifies the job
    datamodule = construct(cfg.data)
    check_test_weights(cfg, datamodule)
    stages = plan_stages(cfg)
    if cache_options(cfg) and not any(stage.teachers for stage in stages):
        raise ConfigError(f"teacher_cache={cfg.teacher_cache.storage} caches a frozen teacher's outputs, but no stage "
                          f"of this run distils from a trained teacher (stages: {[s.name for s in stages]}). Use "
                          f"{OFF_SWITCH}.")
    resume = resumed_stage(cfg, stages)
    # Build every stage once with untrained networks first, so a bad model, term or tap name fails in
    # seconds instead of after the teachers and the baseline have trained.
    untrained: dict[str, dict[str, torch.nn.Module]] = {}
    for stage in stages:
        untrained[stage.name] = build_stage_module(stage_config(cfg, stage), stage, datamodule,
                                                   teacher_arguments(stage, untrained)).products()
    products: dict[str, dict[str, torch.nn.Module]] = {}
    records: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = {}
    trainer = None
    for stage in stages:
        stage_cfg = stage_config(cfg, stage)
        keys[stage.name] = recipe_key(stage_recipe(stage_cfg, stage, keys))
        products[stage.name], records[stage.name], trainer = run_stage(
            stage_cfg, stage, datamodule, products, keys[stage.name], cfg.ckpt_path if stage.name == resume else None)
        records[stage.name].update(label=stage.label, models=dict(stage.networks), key=keys[stage.name],
                                   size={role: network_size(net, datamodule.example_input())
                                         for role, net in products[stage.name].items()})
        warning = stage_warning(stage, records, datamodule.num_classes)
        if warning:
            records[stage.name]["warning"] = warning
            log.warning(warning)
    last = stages[-1]
    results: dict[str, Any] = {**job, "student": OmegaConf.to_container(cfg.student, resolve=True), "stages": records,
                               "student_metrics": records[last.name]["metrics"], "loss": records[last.name].get("loss"),
                               "world_size": trainer.world_size if trainer is not None else 1}
    if "teacher" in records:
        results["teacher"] = {**records["teacher"], "model": records["teacher"]["models"]["student"]}
    if "baseline" in records:
        results["baseline"] = records["baseline"]["metrics"]
    if trainer is None or trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        for role, network in products[last.name].items():
            export_student(network, output_dir / f"{role}.pt", records[last.name]["metrics"])
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        rows = [row for stage in stages for row in table_rows(stage, records[stage.name], products[stage.name])]
        teacher = records.get("teacher", {}).get("size", {}).get("student", {}).get("params")
        print(format_table(rows, cfg.get("task_name", "train"), reference_params=teacher))
        for record in records.values():
            if "warning" in record:
                print(f"WARNING: {record['warning']}")
    return results
