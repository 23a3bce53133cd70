"""Re-running a sweep into its directory skips the jobs whose config already has a result and reruns the rest.

`kd-train -m ... hydra.sweep.dir=<dir>` a second time: each job looks for a `results.json` with its own
config hash (kd_lightning/sweeps/identity.py) anywhere under the sweep directory — found by config, not by job
number, so a job renumbered by a longer sweep list still finds its result. A skipped job trains nothing and
hands the previous result's objective to the sweeper; a config whose last attempt failed (its `error.json`)
is rerun, and each case says so in one log line. Called by the job itself, so it works under every launcher.

Renumbered jobs also meet directories that hold another config's files (Hydra has already rewritten
their `.hydra/`): those move to `<sweep dir>/displaced/<their hash>-*` before the job trains, so no result is
overwritten — their results.json name their own overrides and are still found there.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from kd_lightning.sweeps.identity import RESULTS_FILE, config_hash
from kd_lightning.sweeps.failures import ERROR_FILE, read_record

log = logging.getLogger(__name__)


DISPLACED_DIR = "displaced"


def reuse_finished_job(cfg: DictConfig, sweep_dir: Path, job_dir: Path, job_num: int) -> dict[str, Any] | None:
    """The newest earlier result of this job's config in `sweep_dir`, or None when the job must train."""
    try:
        digest = config_hash(cfg)
    except OmegaConfBaseException:
        return None  # a config that does not resolve: the job fails with its own error where it is used
    displace_other_config(sweep_dir, job_dir, digest, job_num)
    finished = [(path, record) for path in sweep_dir.rglob(RESULTS_FILE)
                if (record := read_record(path)).get("config_hash") == digest]
    if finished:
        path, results = max(finished, key=lambda item: item[0].stat().st_mtime)
        log.info("job %s: result exists for config %s (%s), skipped", job_num, digest, path.parent)
        return results
    failed = [path for path in sweep_dir.rglob(ERROR_FILE) if read_record(path).get("config_hash") == digest]
    if failed:
        log.info("job %s: config %s failed before (%s), rerun", job_num, digest, failed[0].parent)
    return None


def displace_other_config(sweep_dir: Path, job_dir: Path, digest: str, job_num: int) -> None:
    """Move the files of another config's job out of `job_dir` (all but Hydra's `.hydra/` and the job logs)."""
    records = [read_record(job_dir / name) for name in (RESULTS_FILE, ERROR_FILE) if (job_dir / name).is_file()]
    other = next((record.get("config_hash") for record in records if record.get("config_hash") != digest), None)
    if other is None:
        return
    (sweep_dir / DISPLACED_DIR).mkdir(exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"{other}-", dir=sweep_dir / DISPLACED_DIR))
    for entry in job_dir.iterdir():
        if entry.name != ".hydra" and entry.suffix != ".log":
            shutil.move(entry, target / entry.name)
    log.info("job %s: %s held config %s, moved to %s", job_num, job_dir, other, target)
