"""The main job: obtain a teacher, train the student baseline, train the distilled student, report.

Each phase gets its own Trainer and its own loggers (named after the phase), so a W&B run, a CSV log
and a checkpoint directory each hold exactly one training. Everything is built from the Hydra config.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lightning.errors import ConfigError
from kd_lightning.report import format_table
from kd_lightning.schemes import Offline, Supervised
from kd_lightning.schemes.base import check_no_terms
from kd_lightning.teachers import FrozenTeacher, export_student, load_weights, read_metrics, recipe_key
from kd_lightning.validate import check_settings

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


def build_loggers(cfg: DictConfig, phase: str) -> list:
    loggers = []
    for key, logger_cfg in (cfg.get("logger") or {}).items():
        if logger_cfg is None:
            continue
        target = str(logger_cfg.get("_target_", ""))
        overrides: dict[str, Any] = {}
        if target.endswith("WandbLogger"):
            run_name = logger_cfg.get("name") or f"{cfg.get('task_name', 'train')}/{Path(cfg.paths.output_dir).name}"
            overrides = {"name": f"{run_name}-{phase}", "group": logger_cfg.get("group") or run_name, "job_type": phase}
        elif "name" in logger_cfg or target.endswith(("CSVLogger", "TensorBoardLogger")):
            overrides = {"name": f"{logger_cfg.get('name') or key}/{phase}"}
        loggers.append(instantiate(logger_cfg, **overrides))
    return loggers


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
                 max_epochs: int | None = None, test: bool = True) -> tuple[dict[str, float], L.Trainer]:
    loggers = build_loggers(cfg, phase)
    trainer_overrides: dict[str, Any] = {"logger": loggers or False, "callbacks": build_callbacks(cfg, bool(loggers)),
                                         "default_root_dir": str(Path(cfg.paths.output_dir) / phase)}
    if max_epochs is not None:
        trainer_overrides["max_epochs"] = max_epochs
    trainer: L.Trainer = instantiate(cfg.trainer, **trainer_overrides)
    if loggers:
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path") if phase == "student" else None)
    if test:
        trainer.test(module, datamodule=datamodule, verbose=False)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()
               if key.startswith(("test/", "val/acc"))}
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
    return {name: construct(term_cfg) for name, term_cfg in (cfg.get("distill") or {}).items()}


def teacher_recipe(cfg: DictConfig) -> dict[str, Any]:
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    for irrelevant in ("default_root_dir", "log_every_n_steps", "enable_progress_bar", "enable_model_summary",
                       "devices", "num_nodes", "strategy"):
        trainer.pop(irrelevant, None)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for irrelevant in ("num_workers", "pin_memory", "root", "system_dir"):
        data.pop(irrelevant, None)
    return {"model": OmegaConf.to_container(cfg.teacher.model, resolve=True), "data": data, "trainer": trainer,
            "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
            "scheduler": OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
            "max_epochs": cfg.teacher.get("max_epochs"), "lr": cfg.teacher.get("lr"), "seed": cfg.teacher.seed}


def evaluate(cfg: DictConfig, model: torch.nn.Module, datamodule: Any) -> dict[str, float]:
    module = Supervised(model, **scheme_kwargs(cfg, datamodule))
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_progress_bar=False,
                          default_root_dir=str(Path(cfg.paths.output_dir) / "teacher"))
    trainer.test(module, datamodule=datamodule, verbose=False)
    return {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("test/")}


def obtain_teacher(cfg: DictConfig, datamodule: Any) -> tuple[torch.nn.Module, dict[str, float], str]:
    """A trained teacher and its test metrics: from teacher.checkpoint, local weights, the cache, or training."""
    teacher = build_model(cfg.teacher.model, datamodule)
    if cfg.teacher.get("checkpoint"):
        load_weights(teacher, cfg.teacher.checkpoint)
        return teacher, evaluate(cfg, teacher, datamodule), f"checkpoint {cfg.teacher.checkpoint}"
    if cfg.teacher.model.get("weights"):
        return teacher, evaluate(cfg, teacher, datamodule), f"torchvision weights {cfg.teacher.model.weights}"
    cache_file = Path(cfg.paths.cache_dir) / "teachers" / f"{teacher.kd_spec['name'].replace(':', '_')}-{recipe_key(teacher_recipe(cfg))}.pt"
    if cache_file.is_file():
        load_weights(teacher, cache_file)
        return teacher, read_metrics(cache_file), f"cache {cache_file}"
    L.seed_everything(cfg.teacher.seed, workers=True)
    teacher = build_model(cfg.teacher.model, datamodule)
    teacher_cfg = copy.deepcopy(cfg)
    if cfg.teacher.get("max_epochs") is not None:
        # Set in the config, not only on the Trainer, so schedules that read it (cosine T_max) follow.
        with open_dict(teacher_cfg):
            teacher_cfg.trainer.max_epochs = cfg.teacher.max_epochs
    options = scheme_kwargs(teacher_cfg, datamodule)
    if cfg.teacher.get("lr") is not None:  # e.g. RepDistiller trains teachers at 0.05 for lr-0.01 students
        options["optimizer"] = instantiate(cfg.optimizer, lr=cfg.teacher.lr)
    metrics, trainer = fit_and_test(teacher_cfg, Supervised(teacher, **options), datamodule, "teacher")
    if trainer.is_global_zero:
        export_student(teacher, cache_file, metrics)
    trainer.strategy.barrier("teacher-cache")
    return teacher, metrics, f"trained, cached at {cache_file}"


def build_offline(cfg: DictConfig, scheme_class: type, teacher: torch.nn.Module, datamodule: Any,
                  scheme_options: dict[str, Any]) -> Offline:
    return scheme_class(student=build_model(cfg.student, datamodule), teacher=FrozenTeacher(teacher),
                        terms=build_terms(cfg), example_input=datamodule.example_input(),
                        train_size=datamodule.train_size, train_targets=datamodule.train_targets,
                        max_epochs=cfg.trainer.max_epochs, **scheme_options, **scheme_kwargs(cfg, datamodule))


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured job and return its results (also written to `<output_dir>/results.json`)."""
    check_settings(cfg)
    check_accelerator(cfg.trainer)
    scheme_class = get_class(cfg.scheme._target_)
    datamodule = construct(cfg.data)
    results: dict[str, Any] = {"student": OmegaConf.to_container(cfg.student, resolve=True)}
    rows: list[tuple[str, str, dict[str, float]]] = []
    scheme_options = {key: value for key, value in cfg.scheme.items() if key != "_target_"}

    if issubclass(scheme_class, Offline):
        # Build everything once with an untrained teacher first, so a bad student, term or tap name fails in
        # seconds instead of after the teacher and the baseline have trained.
        build_offline(cfg, scheme_class, build_model(cfg.teacher.model, datamodule), datamodule, scheme_options)
        teacher, teacher_metrics, source = obtain_teacher(cfg, datamodule)
        results["teacher"] = {"metrics": teacher_metrics, "source": source,
                              "model": OmegaConf.to_container(cfg.teacher.model, resolve=True)}
        rows.append(("teacher", teacher.kd_spec["name"], teacher_metrics))
        if cfg.get("baseline"):
            L.seed_everything(cfg.seed, workers=True)
            baseline_module = Supervised(build_model(cfg.student, datamodule), **scheme_kwargs(cfg, datamodule))
            results["baseline"], _ = fit_and_test(cfg, baseline_module, datamodule, "baseline")
            rows.append(("student baseline", cfg.student.name, results["baseline"]))
        L.seed_everything(cfg.seed, workers=True)
        module = build_offline(cfg, scheme_class, teacher, datamodule, scheme_options)
        init_epochs = max((term.init_epochs for term in module.terms.values()), default=0)
        if init_epochs and not cfg.get("ckpt_path"):  # a resumed run restores the initialised adapters
            module.set_init_stage(True)
            fit_and_test(cfg, module, datamodule, "init", max_epochs=init_epochs, test=False)
            module.set_init_stage(False)
        label = f"student + {'+'.join(cfg.distill or {}) or 'teacher'}"
    else:
        check_no_terms(cfg.get("distill"), cfg.scheme._target_.rsplit(".", 1)[-1].lower())
        L.seed_everything(cfg.seed, workers=True)
        module = scheme_class(student=build_model(cfg.student, datamodule), **scheme_options,
                              **scheme_kwargs(cfg, datamodule))
        label = "supervised"
    results["student_metrics"], trainer = fit_and_test(cfg, module, datamodule, "student")
    results["world_size"] = trainer.world_size
    rows.append((label, cfg.student.name, results["student_metrics"]))
    if trainer.is_global_zero:
        export_student(module.student, Path(cfg.paths.output_dir) / "student.pt", results["student_metrics"])
        (Path(cfg.paths.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
        print(format_table(rows, cfg.get("task_name", "train")))
    return results
