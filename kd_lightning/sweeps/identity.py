"""What identifies a job across re-runs of its sweep: the hash of its resolved config, its overrides, its W&B group.

Hydra numbers a sweep's jobs in sweep order, so a job number names a different configuration once a value
is added to a sweep list. The hash names the configuration itself: every `paths.*` value (the output dir
holds the job number; data and cache dirs say where files live, not what trains) is replaced by a
placeholder before resolving, and Hydra's own node is left out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

RESULTS_FILE = "results.json"


def config_hash(cfg: DictConfig) -> str:
    """12 hex digits of the resolved job config, the same for the same settings whatever the job's number."""
    config = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # a copy, interpolations unresolved
    config.pop("hydra", None)
    for key in list(config.get("paths") or {}):
        config.paths[key] = f"<paths.{key}>"  # also in everything interpolating it (save_dir, data roots)
    resolved = OmegaConf.to_container(config, resolve=True)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:12]


def sweep_name() -> str | None:
    """The running sweep's name (its directory's), or None outside a `kd-train -m` job."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


def wandb_settings(cfg: DictConfig) -> dict[str, Any] | None:
    """Where the job's W&B runs went (first W&B logger), so `kd-report` can put its summary run beside them."""
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg is not None and str(logger_cfg.get("_target_", "")).endswith("WandbLogger"):
            return {"project": logger_cfg.get("project"), "entity": logger_cfg.get("entity"),
                    "group": logger_cfg.get("group") or sweep_name(), "offline": bool(logger_cfg.get("offline"))}
    return None


def job_record(cfg: DictConfig) -> dict[str, Any]:
    """The part of results.json that lets a re-run sweep and `kd-report` recognise the job."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    record: dict[str, Any] = {"config_hash": config_hash(cfg), "overrides": overrides}
    if cfg.get("optimized_metric"):  # what `kd-report` shows for search trials, which test nothing
        record["optimized_metric"] = str(cfg.optimized_metric)
    if cfg.get("second_objective"):  # a multi-objective search: `kd-report` draws its Pareto front
        record["second_objective"] = str(cfg.second_objective)
    if (wandb := wandb_settings(cfg)) is not None:
        record["wandb"] = wandb
    return record
