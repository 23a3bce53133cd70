"""Sweeps and searches (`kd-train -m`), one concern in one place.

- `search.py`: the Optuna sweeper behind `hparams_search=kd_optuna` (ask a batch, launch, tell), found by Hydra
  through `hydra_plugins/kd_optuna_sweeper`; `study.py`: the study's storage, sampler and pruner by name.
- `pruning.py`: the Lightning callback that reports a trial's validation metric each epoch and stops it.
- `objective.py`: what a search may optimise (held-out validation metrics; the student's size as a second one).
- `checks.py`: the sweep's settings refused before the first job (`hydra.callbacks`).
- `failures.py`: failed jobs recorded while the sweep goes on; `resume.py`: a rerun skips finished configs, found
  by `identity.py`'s config hash.
- `report.py` (`kd-report`), `wandb_summary.py`, `best.py` (`kd-best`): what a finished sweep is read into.
"""
