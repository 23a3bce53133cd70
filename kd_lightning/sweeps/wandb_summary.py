"""`kd-report`'s W&B summary: one run (job_type "report") in the sweep's group with the tables and the plot.

Only for sweeps that logged to W&B: their jobs' results.json record the project, entity, group and
offline mode of their runs (kd_lightning/sweeps/identity.py), and the summary run uses the same ones, so it
sits beside the job runs; offline, it is written under `<sweep dir>/wandb` for `wandb sync`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kd_lightning.errors import ConfigError


def log_summary_run(settings: dict[str, Any], sweep_dir: Path, tables: dict[str, tuple[list[str], list[list[Any]]]],
                    plot_file: Path, config: dict[str, Any]) -> Path:
    """One W&B run logging each table (name → (columns, rows)) as a `wandb.Table` and the plot as a
    `wandb.Image`; the run's local directory."""
    import wandb

    group = settings.get("group") or sweep_dir.name
    try:
        run = wandb.init(project=settings.get("project"), entity=settings.get("entity"), group=group,
                         job_type="report", name=f"{group}-report", dir=str(sweep_dir),
                         mode="offline" if settings.get("offline") else None, config=config)
    except wandb.errors.Error as error:  # not logged in, no network: the markdown and the plot are written
        raise ConfigError(f"The W&B summary run of {sweep_dir} could not start ({error}); report.md and report.png "
                          f"are written. Log in with `wandb login`, set WANDB_MODE=offline to write the run for a "
                          f"later `wandb sync`, or pass --no-wandb.") from None
    logged: dict[str, Any] = {name: wandb.Table(columns=columns, data=data) for name, (columns, data) in tables.items()}
    run.log({**logged, "plot": wandb.Image(str(plot_file))})
    run_dir = Path(run.dir).parent  # run.dir is the run's files/ directory
    run.finish()
    return run_dir
