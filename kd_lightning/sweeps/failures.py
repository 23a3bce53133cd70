"""A failed job of `kd-train -m` is recorded and the sweep goes on; the process exits non-zero at the end.

Hydra runs each job inside `run_job`, which turns an exception into a FAILED `JobReturn` and hands it to
`on_job_end`. `RecordFailedJobs` writes it to `<job dir>/error.json` (with the job's config hash, see
kd_lightning/sweeps/identity.py) and rebuilds `<sweep dir>/failures.json` from every job's file, so the record
is complete whichever launcher ran the jobs and even if the sweep is killed part-way. A record stays until
a job of the same config completes, so a re-run sweep knows which of its jobs failed before.
`finish_sweep` prints the summary and gives the exit status.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import ConfigError
from kd_lightning.sweeps.identity import config_hash

log = logging.getLogger(__name__)
ERROR_FILE = "error.json"
FAILURES_FILE = "failures.json"
_sweep_dirs: list[Path] = []  # sweeps started in this process, for finish_sweep


class JobFailed(CompactHydraException):
    """Raised by a sweep job in place of its error: Hydra prints a compact exception's text without a traceback."""


class RecordFailedJobs(Callback):
    def __init__(self) -> None:
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        # Before the sweeper starts: Optuna's SQLite storage (hparams_search) lives in the sweep directory.
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        (self.sweep_dir / FAILURES_FILE).unlink(missing_ok=True)  # from an earlier sweep into the same directory
        _sweep_dirs.append(self.sweep_dir)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.sweep_dir is None:
            return
        digest = safe_config_hash(config)
        if job_return.status == JobStatus.COMPLETED:
            forget_failures(self.sweep_dir, Path(config.hydra.runtime.output_dir), digest)
            return
        if job_return.status != JobStatus.FAILED:
            return
        # `return_value` would re-raise the error; the stored exception is what Hydra caught.
        error = job_return._return_value
        error = error.__cause__ if isinstance(error, JobFailed) and error.__cause__ is not None else error
        job_dir = Path(config.hydra.runtime.output_dir)
        record = {"job": config.hydra.job.num, "overrides": list(job_return.overrides or []),
                  "dir": str(job_dir), "config_hash": digest, "error_type": type(error).__name__,
                  "message": str(error),
                  "traceback": "".join(traceback.format_exception(error))}
        job_dir.mkdir(parents=True, exist_ok=True)
        (job_dir / ERROR_FILE).write_text(json.dumps(record, indent=2))
        write_failures(self.sweep_dir)
        if isinstance(error, ConfigError):
            log.error("Job %s failed: %s The sweep goes on; recorded in %s", record["job"], error,
                      job_dir / ERROR_FILE)
        else:  # unexpected: the traceback is the lead, so it goes to the job's log as well
            log.error("Job %s failed; the sweep goes on; recorded in %s", record["job"], job_dir / ERROR_FILE,
                      exc_info=error)


def safe_config_hash(config: DictConfig) -> str | None:
    try:
        return config_hash(config)
    except Exception:  # a config that cannot resolve fails its job; its record must still be written
        return None


def forget_failures(sweep_dir: Path, job_dir: Path, digest: str | None) -> None:
    """Remove the job directory's record and every record of the same config: the config has a result now."""
    for path in sweep_dir.rglob(ERROR_FILE):
        same_config = digest is not None and read_record(path).get("config_hash") == digest
        if same_config or path.parent.resolve() == job_dir.resolve():
            path.unlink(missing_ok=True)


def read_record(path: Path) -> dict[str, Any]:
    """A job's JSON record, or {} for one being written or cut short by a killed job."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_failures(sweep_dir: Path) -> list[dict[str, Any]]:
    failures = sorted((json.loads(path.read_text()) for path in sweep_dir.rglob(ERROR_FILE)),
                      key=lambda record: record["job"])
    summary = [{key: record[key] for key in ("job", "overrides", "dir", "error_type", "message")}
               for record in failures]
    (sweep_dir / FAILURES_FILE).write_text(json.dumps({"failed": len(summary), "jobs": summary}, indent=2))
    return failures


def finish_sweep() -> int:
    """Print a summary of this process's sweeps' failed jobs to stderr; the number of failed jobs."""
    failed = 0
    while _sweep_dirs:
        sweep_dir = _sweep_dirs.pop(0)
        failures = write_failures(sweep_dir)
        if not failures:
            continue
        failed += len(failures)
        job_overrides = [OmegaConf.load(path) for path in sweep_dir.rglob(".hydra/overrides.yaml")]
        shared = set.intersection(*(set(overrides) for overrides in job_overrides)) if job_overrides else set()
        # Only what this job's sweep varied: the settings shared by every job say nothing about the failure.
        lines = [f"  job {record['job']} ({' '.join(o for o in record['overrides'] if o not in shared)}): "
                 f"{record['error_type']}: {record['message']}" for record in failures]
        jobs = max(len(job_overrides), len(failures))  # without hydra.output_subdir there are no overrides files
        print(f"\nkd-train: {len(failures)} of {jobs} sweep jobs failed; every job ran. Each failed job's "
              f"{ERROR_FILE} holds its traceback; {sweep_dir / FAILURES_FILE} lists them:\n" + "\n".join(lines),
              file=sys.stderr)
    return failed
