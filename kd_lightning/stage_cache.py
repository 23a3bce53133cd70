"""The stage cache: a trained stage's products in `paths.cache_dir/stages/<stage>-<models>-<key>.pt`.

The key hashes what decides the stage's trained weights (`stage_recipe`), including the keys of the stages
it learns from, so a sweep over students, methods or seeds trains each teacher once and a changed teacher
recipe invalidates everything downstream.

Jobs started together with a cold cache (every job of a parallel or SLURM sweep) must not each train the
same teacher: `stage_lock` lets one job train a missing stage while the others wait for its file and then
load it. The lock is `filelock.SoftFileLease`, an O_EXCL marker file (which works on NFS and Lustre, where
fcntl locks may not) that its holder refreshes from a heartbeat thread; a holder that crashed is replaced
at once on its own host (its pid is gone) and after `LEASE_SECONDS` without a refresh from another host.
The lock only saves work: files are written to a temporary name and renamed into place, so a reader never
sees half a file, and two jobs that both trained a stage (an expired lease) write the same recipe's result.

A file that cannot be read as the stage's products (truncated by a full disk, a killed copy) is damaged,
not a reason to end the job: the stage trains again and replaces it, with a one-line warning naming it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from filelock import SoftFileLease, Timeout
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning.checkpoint_selection import weight_choice_recipe
from kd_lightning.stages import Stage
from kd_lightning.teacher_cache import cache_options
from kd_lightning.teachers import load_products, read_metrics

log = logging.getLogger(__name__)

# A waiting job takes the lock of a holder on another host after this long without a heartbeat (one every
# third of it); on the holder's own host a dead pid is noticed at once.
LEASE_SECONDS = 60.0
MIXING_ALPHAS = ("mixup_alpha", "cutmix_alpha")
MIXING_OPTIONS = (*MIXING_ALPHAS, "mix_prob", "mix_switch_prob", "label_smoothing")
POLL_SECONDS = 1.0  # how often a waiting job looks at the marker: cheap, also on a shared filesystem


def stage_recipe(stage_cfg: DictConfig, stage: Stage, teacher_keys: dict[str, str]) -> dict[str, Any]:
    """What decides a stage's trained weights (its cache key), including the keys of the stages it learns from."""
    trainer = OmegaConf.to_container(stage_cfg.trainer, resolve=True)
    for irrelevant in ("default_root_dir", "log_every_n_steps", "enable_progress_bar", "enable_model_summary",
                       "devices", "num_nodes", "strategy"):
        trainer.pop(irrelevant, None)
    data = OmegaConf.to_container(stage_cfg.data, resolve=True)
    for irrelevant in ("num_workers", "pin_memory", "root", "system_dir"):
        data.pop(irrelevant, None)
    if not any(float(data.get(alpha) or 0) > 0 for alpha in MIXING_ALPHAS):
        # Unmixed batches: the mixing options change nothing, and keys from before they existed stay valid.
        for option in MIXING_OPTIONS:
            data.pop(option, None)
    scheduler = stage_cfg.get("scheduler")
    recipe = {"scheme": dict(stage.scheme), "networks": dict(stage.networks), "distill": dict(stage.distill or {}),
              "seed": stage.seed, "data": data, "trainer": trainer,
              "optimizer": OmegaConf.to_container(stage_cfg.optimizer, resolve=True),
              "scheduler": OmegaConf.to_container(scheduler, resolve=True) if scheduler else None,
              "teachers": {name: teacher_keys[name] for name in stage.teacher_names()},
              **weight_choice_recipe(stage_cfg)}
    if float(stage_cfg.get("labeled_fraction", 1.0)) < 1:
        recipe["labeled_fraction"] = float(stage_cfg.labeled_fraction)
    read = stage_inputs(stage_cfg, stage)
    if read:
        # What the stage's networks read: a named view's definition (its draw, its size) trains another network;
        # views only other stages read leave the key alone (a cross-resolution student keeps its teacher).
        recipe["inputs"] = read
    cache = cache_options(stage_cfg)
    if stage.teachers and cache is not None and not cache.lossless:
        recipe["teacher_outputs"] = cache.dtype  # rounded teacher outputs train a (slightly) different network
    return recipe


def stage_inputs(stage_cfg: DictConfig, stage: Stage) -> dict[str, Any]:
    """The named inputs a stage reads, each with its definition (None for a source of the data): its networks'
    (`input` of their configs) and the roles its scheme reads itself (the mean teacher's, MLKD's strong view)."""
    inputs = stage_cfg.get("inputs") or {}
    names = {model.get("input") for value in stage.networks.values()
             for model in (value if isinstance(value, (list, tuple)) else [value])}
    names |= {inputs.get(role) for role in ("ema_teacher", "strong")}
    views = inputs.get("views") or {}
    return {name: OmegaConf.to_container(views[name], resolve=True) if name in views else None
            for name in sorted(name for name in names if name is not None)}


def stage_file(cfg: DictConfig, stage: Stage, key: str) -> Path:
    models = stage.model_names().replace(", ", "+").replace(":", "_")
    return Path(cfg.paths.cache_dir) / "stages" / f"{stage.name}-{models}-{key}.pt"


def load_cached(networks: Mapping[str, nn.Module], path: Path) -> dict[str, float] | None:
    """Load a cached stage's products into `networks` and return its metrics; None when there is no usable
    file. A damaged file is reported in one line and left for the stage's new training to replace."""
    if not path.is_file():
        return None
    try:
        load_products(networks, path)
        return read_metrics(path)
    except Exception as error:  # whatever torch.load or load_state_dict make of a damaged file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
        log.warning(f"stage cache: {path} is damaged ({type(error).__name__}: {reason}); training the stage again "
                    f"to replace it.")
        return None


def file_version(path: Path) -> tuple[int, int, int] | None:
    """What tells one file at `path` from its replacement (inode, size, mtime); None when there is none."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


def single_process(cfg: DictConfig) -> bool:
    """Whether the run trains in one process. Ranks of one multi-process job train a stage together, so they
    must not wait for each other's lock: such jobs keep training a missing stage without one."""
    trainer = cfg.trainer
    devices = trainer.get("devices", 1)
    one_device = len(devices) == 1 if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)) else \
        str(devices) == "1"
    return int(trainer.get("num_nodes", 1)) == 1 and one_device


@contextmanager
def stage_lock(path: Path, enabled: bool = True) -> Iterator[None]:
    """Hold the right to train the stage cached at `path`; waits while another job holds it."""
    if not enabled:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = SoftFileLease(f"{path}.lock", lease_duration=LEASE_SECONDS, poll_interval=POLL_SECONDS)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info(f"stage cache: another job (pid {lock.pid}) is training {path.name}; waiting for its file")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
