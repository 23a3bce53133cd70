"""`kd-train`: the Hydra entry point. `python -m kd_lightning.train --help` lists the config groups."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

from kd_lightning.cli_checks import check_command_line
from kd_lightning.errors import ConfigError
from kd_lightning.sweeps.objective import check_search_objective, is_search, objective_values
from kd_lightning.sweeps.failures import JobFailed, finish_sweep
from kd_lightning.sweeps.identity import job_record
from kd_lightning.sweeps.pruned import PrunedTrial, TrialStopped, record_pruned
from kd_lightning.sweeps.resume import reuse_finished_job


# An absolute path: relative ones are resolved as a Python package when run as the `kd-train` console script.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def main() -> None:
    """Check the command line's config-group names, run Hydra, and end a sweep with its failed jobs."""
    try:
        check_command_line(sys.argv[1:], CONF_DIR)
    except ConfigError as error:
        print(f"kd-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        train_job()
    finally:  # also when Hydra exits with the first failed job's error after running the whole batch
        failed = finish_sweep()
    if failed:
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train_job(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # a re-run sweep: a config with a result does not train again
        previous = reuse_finished_job(cfg, Path(hydra_cfg.sweep.dir), Path(hydra_cfg.runtime.output_dir),
                                      hydra_cfg.job.num)
        if previous is not None:  # checked before torch is imported, so a sweep of finished jobs takes seconds
            return objective_values(cfg, previous)
    from kd_lightning.pipeline import construct, run  # after Hydra parsed the arguments, so --help stays fast

    quiet_lightning_console()
    if checkpoint := requeued_checkpoint(cfg):
        cfg.ckpt_path = checkpoint
    sweeper = hydra_cfg.sweeper.get("_target_") if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        if is_search(sweeper):
            check_search_objective(sweeper, cfg, construct(cfg.data))
        results = run(cfg)
    except Exception as error:
        if isinstance(error, TrialStopped):  # the study's pruner stopped this trial: a result, not a failure
            return pruned_trial(cfg, error)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # Raised, not exited: Hydra records the job as failed and runs the rest of the sweep.
            cause = error.__cause__ if isinstance(error.__cause__, ConfigError) else error
            raise JobFailed(f"{type(cause).__name__}: {cause}") from cause
        if not isinstance(error, (ConfigError, InstantiationException)):
            raise
        # A user mistake: the message names the fix; a traceback would only bury it. Hydra wraps errors
        # raised inside constructors, so show the ConfigError itself when there is one.
        error = error.__cause__ if isinstance(error.__cause__, ConfigError) else error
        print(f"\nkd-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    return objective_values(cfg, results)


def pruned_trial(cfg: DictConfig, stopped: TrialStopped) -> PrunedTrial:
    """Record a pruned trial in its job directory and hand the sweeper the `PrunedTrial` it tells the study."""
    record_pruned(Path(cfg.paths.output_dir), job_record(cfg), stopped.pruned)
    print(f"kd-train: {stopped}", file=sys.stderr)
    return stopped.pruned


def requeued_checkpoint(cfg: DictConfig) -> str | None:
    """On a SLURM requeue (pre-emption, timeout), the job's newest checkpoint, so it resumes where it stopped.

    SLURM counts a job's restarts in SLURM_RESTART_COUNT; submitit requeues with the same job directory.
    Candidates: `last.ckpt` (kept every N steps by callbacks=default) and the `hpc_ckpt_*.ckpt` Lightning
    saves when SLURM signals a plain `srun` job before requeueing it. Init phases (`<stage>_init`) are short
    and restart from scratch, so their checkpoints are not candidates.
    """
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1 or cfg.get("ckpt_path"):
        return None
    output_dir = Path(cfg.paths.output_dir)
    candidates = [path for pattern in ("last*.ckpt", "hpc_ckpt_*.ckpt") for path in output_dir.rglob(pattern)
                  if not path.relative_to(output_dir).parts[0].endswith("_init")]
    return str(max(candidates, key=lambda path: path.stat().st_mtime)) if candidates else None


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def quiet_lightning_console() -> None:
    """One copy of each Lightning message, through Hydra's handlers (console + run log), without adverts."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.addFilter(_DropAdverts())
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdverts())


if __name__ == "__main__":
    main()
