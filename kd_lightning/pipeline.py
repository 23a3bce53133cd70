"""The main job: run the plan's stages in order (by default teacher, baseline, distilled student), report.

`kd_lightning.stages` turns the config into the list of stages; `stage_build` builds a stage's scheme,
`trainer_setup` its Trainer, loggers and callbacks (one of each per stage and per init phase), and
`stage_cache` stores and reads back what a cached stage trained. This module runs them in order, keeps each
stage's products for the stages after it, and writes `results.json` and the closing table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from kd_lightning.checkpoint_selection import check_test_weights
from kd_lightning.errors import ConfigError
from kd_lightning.sweeps.identity import job_record
from kd_lightning.report import format_table, network_size, stage_warning
from kd_lightning.stage_build import (CONTEXT, build_model, configure_inputs, build_stage_module, build_terms, constructor_parameters,
                                      construct, scheme_kwargs, stage_config, teacher_arguments)
from kd_lightning.stage_cache import (file_version, load_cached, single_process, stage_file, stage_lock,
                                      stage_recipe)
from kd_lightning.stages import Stage, plan_stages
from kd_lightning.teacher_cache import OFF_SWITCH, cache_options
from kd_lightning.teachers import export_student, load_weights, recipe_key, save_products
from kd_lightning.trainer_setup import (build_callbacks, build_loggers, check_accelerator, checkpoint_record, evaluate,
                                        fit_and_test, resumed_wandb_run_id)
from kd_lightning.validate import check_settings

log = logging.getLogger(__name__)

# Names that tests, scripts and other modules import from here (moved to the modules above).
__all__ = ["CONTEXT", "build_callbacks", "build_loggers", "build_model", "build_stage_module", "build_terms",
           "check_accelerator", "checkpoint_record", "construct", "constructor_parameters", "evaluate", "fit_and_test",
           "plan_stages", "resumed_wandb_run_id", "run", "run_stage", "scheme_kwargs", "stage_config", "stage_file",
           "stage_recipe", "teacher_arguments"]


def run_stage(stage_cfg: DictConfig, stage: Stage, datamodule: Any, products: dict[str, dict[str, torch.nn.Module]],
              key: str, ckpt_path: str | None) -> tuple[dict[str, torch.nn.Module], dict[str, Any], L.Trainer | None]:
    """Train, load or evaluate one stage; returns (its products by role, its record for results, its trainer)."""
    teachers = teacher_arguments(stage, products, (stage_cfg.get("inputs") or {}).get("teacher"))
    if not stage.trains:
        module = build_stage_module(stage_cfg, stage, datamodule, teachers)
        networks = module.products()
        if stage.checkpoint:
            for network in networks.values():
                load_weights(network, stage.checkpoint)
        network = next(iter(networks.values()))
        source = f"checkpoint {stage.checkpoint}" if stage.checkpoint else f"weights {getattr(network, 'kd_weights', None)}"
        return networks, {"metrics": evaluate(stage_cfg, network, datamodule, stage.name), "source": source}, None
    cache_file = stage_file(stage_cfg, stage, key)
    start = products[stage.init_from] if stage.init_from else None
    if not stage.cache or ckpt_path is not None:  # a resumed stage trains on from its checkpoint
        return train_stage(stage_cfg, stage, datamodule, teachers, cache_file, ckpt_path, start)
    seen = file_version(cache_file)
    cached = cached_stage(stage_cfg, stage, datamodule, teachers, cache_file)
    if cached is not None:
        return cached
    with stage_lock(cache_file, enabled=single_process(stage_cfg)):
        # Written by the job that held the lock while this one waited: read it. The same (damaged or no) file
        # as before: this job trains the stage.
        if file_version(cache_file) != seen:
            cached = cached_stage(stage_cfg, stage, datamodule, teachers, cache_file)
        return cached if cached is not None else train_stage(stage_cfg, stage, datamodule, teachers, cache_file,
                                                             start=start)


def cached_stage(stage_cfg: DictConfig, stage: Stage, datamodule: Any, teachers: dict[str, Any],
                 cache_file: Path) -> tuple[dict[str, torch.nn.Module], dict[str, Any], None] | None:
    """The stage's products read from the stage cache; None when the file is missing or damaged."""
    if not cache_file.is_file():
        return None
    networks = build_stage_module(stage_cfg, stage, datamodule, teachers).products()
    metrics = load_cached(networks, cache_file)
    if metrics is None:
        return None
    if len(networks) == 1 and not any(key.startswith("test/") for key in metrics):
        # Trained by a search trial, which tests nothing: a run that reports test metrics computes them now.
        metrics.update(evaluate(stage_cfg, next(iter(networks.values())), datamodule, stage.name))
    return networks, {"metrics": metrics, "source": f"cache {cache_file}"}, None


def train_stage(stage_cfg: DictConfig, stage: Stage, datamodule: Any, teachers: dict[str, Any], cache_file: Path,
                ckpt_path: str | None = None, start: dict[str, torch.nn.Module] | None = None,
                ) -> tuple[dict[str, torch.nn.Module], dict[str, Any], L.Trainer]:
    """Train the stage (its init phase first), test it, and store it in the stage cache when it is cached.
    `start`: the products of the stage it starts from (`init_from`), whose network its student begins as."""
    L.seed_everything(stage.seed, workers=True)
    module = build_stage_module(stage_cfg, stage, datamodule, teachers)
    module.stage_name = stage.name
    if start is not None and ckpt_path is None:  # a resumed stage's checkpoint holds its weights already
        (source,) = start.values()
        module.student.load_state_dict(source.state_dict())
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
    configure_inputs(cfg, datamodule)
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
                                                   teacher_arguments(stage, untrained, cfg.inputs.get("teacher")
                                                                     if cfg.get("inputs") else None)).products()
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
