"""Checks of a sweep's own settings, run once when `kd-train -m` starts, before any job is launched or queued.

A search over a misspelt key would otherwise fail in its first trial (or, under Optuna, abort the study), a
test-set objective would fail in every trial, and a SLURM job whose task count disagrees with the Trainer's
devices would wait in the queue only to hang or fail on the node. Each is refused here with the fix named.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import ConfigError
from kd_lightning.sweeps.objective import check_search_objective, is_search, objective_names
from kd_lightning.sweeps.study import SWEEPER

SUBMITIT = "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
# Strategies that run one process per device and so can use a SLURM allocation's tasks.
MULTI_PROCESS_STRATEGIES = ("ddp", "fsdp", "deepspeed")


class CheckSweep(Callback):
    """`hydra.callbacks` entry: refuse a bad search space, objective or launcher before the first job."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_sweep(config)
        except ConfigError as error:
            # Hydra would print an exception raised here with its traceback; the message alone names the fix.
            print(f"kd-train: error: {error}", file=sys.stderr)
            sys.exit(2)


def check_sweep(config: DictConfig) -> None:
    sweeper = config.hydra.sweeper.get("_target_")
    if sweeper == SWEEPER:
        check_optuna_search(config)
    if is_search(sweeper):
        check_search_params(config)
        from kd_lightning.pipeline import construct  # torch and Lightning only once a search is configured

        check_search_objective(sweeper, config, construct(config.data))
    check_launcher(config)
    if sweeper == SWEEPER:  # last: a database server is the slowest thing to ask
        from kd_lightning.sweeps.study import check_storage

        check_storage(config.hydra.sweeper.get("storage"))


def config_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config, inner nodes included, without resolving interpolations."""
    keys = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}{key}"
            keys.append(path)
            keys.extend(config_keys(node._get_node(key), f"{path}."))
    return keys


def searched_keys(config: DictConfig) -> list[tuple[str, str]]:
    """(key, where it was given) for the search space: `hydra.sweeper.params` and command-line sweeps."""
    keys = [(str(key), "hydra.sweeper.params (the hparams_search config)")
            for key in config.hydra.sweeper.get("params") or {}]
    overrides = OverridesParser.create().parse_overrides([str(text) for text in config.hydra.overrides.task])
    keys += [(override.get_key_element(), "the command line") for override in overrides
             if override.is_sweep_override() and not override.is_add() and not override.is_force_add()]
    return keys


def check_search_params(config: DictConfig) -> None:
    """Every searched key is a key of the job's config or one of its config groups."""
    task = OmegaConf.masked_copy(config, [key for key in config.keys() if key != "hydra"])
    known = set(config_keys(task)) | set(config.hydra.runtime.choices.keys())
    for key, source in searched_keys(config):
        if key.startswith("+") or key in known:
            continue  # `+key` adds a new key on purpose
        closest = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f" The closest existing key is {closest[0]}." if closest else ""
        raise ConfigError(f"The search space in {source} names {key}, which is not a key of the job's config, "
                          f"so no trial could set it.{hint} Fix the name, or write +{key} to add a new key.")


def check_optuna_search(config: DictConfig) -> None:
    """Sampler, pruner, directions, objectives and storage of `hydra/sweeper=kd_optuna`, each opened once."""
    from kd_lightning.sweeps.search import directions_of, search_space
    from kd_lightning.sweeps.study import MULTI_OBJECTIVE_SAMPLERS, build_pruner, build_sampler, pruner_name

    sweeper = config.hydra.sweeper
    search_space(sweeper.get("params"), [str(text) for text in config.hydra.overrides.task])
    directions = directions_of(sweeper.direction)
    build_sampler(sweeper.get("sampler"))
    build_pruner(sweeper.get("pruner"))
    objectives = objective_names(config)
    if len(objectives) != len(directions):
        raise ConfigError(f"The search optimises {len(objectives)} objective(s) ({', '.join(objectives)}) but "
                          f"hydra.sweeper.direction gives {len(directions)} direction(s) ({', '.join(directions)}). "
                          f"Give one direction per objective, e.g. hydra.sweeper.direction=[maximize,minimize] with "
                          f"second_objective=student/params, or remove second_objective for a single objective.")
    sampler = str((sweeper.get("sampler") or {}).get("name", "tpe"))
    if len(objectives) > 1 and sampler not in MULTI_OBJECTIVE_SAMPLERS:
        raise ConfigError(f"hydra.sweeper.sampler.name={sampler} optimises one objective, but this search has "
                          f"{len(objectives)} ({', '.join(objectives)}). Use one of "
                          f"{', '.join(MULTI_OBJECTIVE_SAMPLERS)} (nsgaii is Optuna's usual choice).")
    if pruner_name(sweeper.get("pruner")) != "none":
        if len(objectives) > 1:
            raise ConfigError(f"hydra.sweeper.pruner.name={pruner_name(sweeper.pruner)} with {len(objectives)} "
                              f"objectives: Optuna prunes single-objective studies only. Set "
                              f"hydra.sweeper.pruner.name=none, or drop second_objective.")
        check_pruning_metric(objectives[0], config.get("trainer"))


def check_pruning_metric(metric: str, trainer_cfg: Any) -> None:
    """Refuse pruning on a metric that no validation epoch logs, before the first trial."""
    if not metric.startswith("val/"):
        raise ConfigError(f"Pruning (hydra.sweeper.pruner.name) compares trials epoch by epoch on optimized_metric, "
                          f"but {metric} is not logged at the end of every validation epoch: only val/* metrics "
                          f"are (val/acc, val/acc_best, val/loss). Set optimized_metric=val/acc, or "
                          f"hydra.sweeper.pruner.name=none.")
    if trainer_cfg is not None and trainer_cfg.get("limit_val_batches", 1) in (0, 0.0):
        raise ConfigError(f"Pruning on {metric} needs a validation epoch, but trainer.limit_val_batches=0 switches "
                          f"validation off. Remove that setting, or set hydra.sweeper.pruner.name=none.")


def check_launcher(config: DictConfig) -> None:
    """A submitit job's tasks are Lightning's processes: one per device on every node, under a DDP strategy."""
    launcher = config.hydra.launcher
    target = str(launcher.get("_target_", ""))
    if not target.startswith(SUBMITIT):
        return
    kind = "slurm" if target.endswith("SlurmLauncher") else "submitit_local"
    trainer = config.trainer
    devices, num_nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ConfigError(f"hydra/launcher={kind} starts one task per device, so trainer.devices must be a number "
                          f"of devices per node, not {devices!r}. Set trainer.devices=<GPUs per node> (the "
                          f"launcher's tasks_per_node and gpus_per_node follow it).")
    tasks, nodes = launcher.get("tasks_per_node", 1), launcher.get("nodes", 1)
    if tasks != devices or nodes != num_nodes:
        raise ConfigError(f"hydra/launcher={kind} asks for {nodes} node(s) × {tasks} task(s), but the Trainer "
                          f"expects trainer.num_nodes={num_nodes} × trainer.devices={devices} processes; Lightning "
                          f"reads its ranks from SLURM only when they agree. Set "
                          f"hydra.launcher.tasks_per_node={devices} hydra.launcher.nodes={num_nodes}, or change "
                          f"trainer.devices/trainer.num_nodes to match (the slurm launcher config sets them "
                          f"equal unless overridden).")
    strategy = str(trainer.get("strategy", "auto"))
    if devices * num_nodes > 1 and not strategy.startswith(MULTI_PROCESS_STRATEGIES):
        raise ConfigError(f"trainer.strategy={strategy} cannot use {devices * num_nodes} devices "
                          f"(trainer.num_nodes={num_nodes} × trainer.devices={devices}) started as separate "
                          f"SLURM tasks: only a multi-process strategy joins them. Use trainer=ddp (or "
                          f"trainer.strategy=ddp), or trainer.devices=1 hydra.launcher.tasks_per_node=1.")
    gpus = launcher.get("gpus_per_node")
    if str(trainer.get("accelerator")) in ("gpu", "cuda") and (gpus is None or gpus < devices):
        raise ConfigError(f"trainer.accelerator={trainer.accelerator} with trainer.devices={devices} needs "
                          f"{devices} GPU(s) per node, but hydra.launcher.gpus_per_node={gpus}. Set "
                          f"hydra.launcher.gpus_per_node={devices}.")


__all__ = ["CheckSweep", "check_launcher", "check_optuna_search", "check_pruning_metric", "check_search_params", "check_sweep"]
