"""The Optuna search behind `hparams_search=kd_optuna`: ask a batch of trials, launch them as jobs, tell the results.

Hydra's own Optuna sweeper is tied to optuna 2.x, so this is the project's, on Optuna's ask-and-tell API. Hydra
finds it as a plugin through `hydra_plugins/kd_optuna_sweeper`, which only forwards here.

- The search space is `hydra.sweeper.params` plus the command line's sweeps, in Hydra's override syntax:
  `interval(a, b)` (float), `int(interval(a, b))`, `tag(log, interval(a, b))`, `choice(...)`, `range(...)`;
  any other value is a fixed setting of every trial.
- The study lives in `hydra.sweeper.storage` (kd_lightning/sweeps/study.py); a rerun with the same storage and
  study name continues it. A trial is launched as job number = its trial number, so a continued study's jobs get
  new directories. Trials left RUNNING by a killed sweep on this machine are marked FAIL and asked again with the
  same parameters, so none is lost.
- Each job learns its trial through `hydra.sweeper.trial` (a Hydra setting, so the job's config hash, and with it
  the resume-by-config of kd_lightning/sweeps/resume.py, does not change) and reports per-epoch values to the
  study itself when a pruner is configured (kd_lightning/sweeps/pruning.py); a job that the pruner stopped is told
  PRUNED, a failed job FAIL, and the search goes on.
- At the end `<sweep dir>/optimization_results.yaml` holds the best trial (`best_params`, `best_value`), or the
  Pareto front (`solutions`) of a multi-objective study, for `kd-best` and `kd-report`.
"""

from __future__ import annotations

import logging
import os
import socket
from itertools import groupby
from pathlib import Path
from typing import Any, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from kd_lightning.errors import ConfigError
from kd_lightning.sweeps.pruned import PrunedTrial
from kd_lightning.sweeps.study import build_pruner, build_sampler, open_storage

log = logging.getLogger(__name__)
RESULTS_FILE = "optimization_results.yaml"
OWNER_ATTR = "kd_sweeper"  # host:pid of the sweeper that asked a trial, to recognise its orphans later


def distribution(override: Override) -> Any:
    """The Optuna distribution of a sweep override, or None for a fixed value."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if not override.is_sweep_override():
        return None
    value = override.value()
    if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if isinstance(value, RangeSweep):
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            # Hydra's range excludes its stop; Optuna's step grid includes its high end.
            return FloatDistribution(value.start, value.stop - value.step, step=value.step)
        return IntDistribution(int(value.start), int(value.stop) - 1, step=int(value.step))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ConfigError(f"The search space entry {override.input_line} is a sweep Optuna cannot sample. Use "
                      f"interval(a, b), tag(log, interval(a, b)), choice(x, y, ...) or range(start, stop, step).")


def search_space(params: DictConfig | None, arguments: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(searched key -> distribution, fixed key -> value) from the config's params and the command line."""
    texts = [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)
    distributions: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in OverridesParser.create().parse_overrides(texts):
        key = override.get_key_element()
        found = distribution(override)
        if found is None:
            fixed[key] = override.get_value_element_as_str()
            distributions.pop(key, None)  # the command line fixes what the config searched
        else:
            distributions[key] = found
            fixed.pop(key, None)
    return distributions, fixed


def directions_of(direction: Any) -> list[str]:
    names = [str(d) for d in direction] if isinstance(direction, (list, tuple)) or OmegaConf.is_list(direction) \
        else [str(direction)]
    bad = [name for name in names if name not in ("maximize", "minimize")]
    if bad:
        raise ConfigError(f"hydra.sweeper.direction names {bad}; each direction is maximize or minimize (a list of "
                          f"them for a multi-objective search, one per objective).")
    return names


class OptunaSearch:
    def __init__(self, sampler: Any = None, pruner: Any = None, direction: Any = "maximize", storage: str | None = None,
                 study_name: str = "kd_optuna", n_trials: int = 20, n_jobs: int = 1, params: Any = None,
                 trial: int | None = None) -> None:
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.direction, self.storage_url, self.study_name = direction, storage, study_name
        self.n_trials, self.n_jobs, self.params = int(n_trials), max(1, int(n_jobs)), params

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def open_study(self) -> Any:
        import optuna

        study = optuna.create_study(study_name=self.study_name, storage=open_storage(self.storage_url),
                                    sampler=build_sampler(self.sampler_cfg), pruner=build_pruner(self.pruner_cfg),
                                    directions=directions_of(self.direction), load_if_exists=True)
        seed = (self.sampler_cfg or {}).get("seed")
        if seed is not None and study.trials:
            # A seeded sampler started afresh would replay the first run's random draws, so a continued study would
            # ask its first points again; offsetting the seed by the trials so far keeps it reproducible and new.
            study.sampler = build_sampler({**self.sampler_cfg, "seed": int(seed) + len(study.trials)})
        return study

    def sweep(self, arguments: list[str]) -> None:
        distributions, fixed = search_space(self.params, arguments)
        study = self.open_study()
        owner = f"{socket.gethostname()}:{os.getpid()}"
        requeue_orphans(study, owner)
        log.info("Study %s in %s: %d trials so far; %d more, %d at a time", self.study_name, self.storage_url,
                 len(study.trials), self.n_trials, self.n_jobs)
        remaining = self.n_trials
        while remaining > 0:
            trials = [ask(study, distributions, owner) for _ in range(min(self.n_jobs, remaining))]
            remaining -= len(trials)
            # Job number = trial number. Another sweeper on the same study may have taken numbers in between, and
            # Hydra numbers a launch's jobs consecutively, so each consecutive run of numbers is one launch.
            for _, run in groupby(enumerate(trials), key=lambda item: item[1].number - item[0]):
                batch = [trial for _, trial in run]
                overrides = [[f"{key}={value}" for key, value in {**fixed, **trial.params}.items()]
                             + [f"hydra.sweeper.trial={trial.number}"] for trial in batch]
                returns = self.launcher.launch(overrides, initial_job_idx=batch[0].number)
                for trial, job in zip(batch, returns):
                    tell(study, trial, job)
        write_results(study, Path(self.config.hydra.sweep.dir))


def ask(study: Any, distributions: dict[str, Any], owner: str) -> Any:
    """The next trial, marked with its sweeper from the moment it runs: a sweeper killed between `ask` and a later
    `set_user_attr` would leave a RUNNING trial that no restart could recognise as its own."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        study.enqueue_trial({}, user_attrs={OWNER_ATTR: owner})  # no fixed parameters: the sampler draws them all
    trial = study.ask(distributions)
    trial.set_user_attr(OWNER_ATTR, owner)  # a waiting trial another sweeper enqueued is this one's now
    return trial


def tell(study: Any, trial: Any, job: Any) -> None:
    from optuna.trial import TrialState

    try:
        value = job.return_value  # re-raises the job's exception for a failed job
    except Exception as error:  # recorded by RecordFailedJobs; the search goes on without this point
        log.warning("trial %d failed (%s: %s); told FAIL", trial.number, type(error).__name__, error)
        study.tell(trial, state=TrialState.FAIL)
        return
    if isinstance(value, PrunedTrial):
        log.info("trial %d pruned at epoch %d", trial.number, value.epoch)
        study.tell(trial, state=TrialState.PRUNED)
        return
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if any(v is None for v in values) or len(values) != len(study.directions):
        log.warning("trial %d returned %r, not %d number(s); told FAIL", trial.number, value, len(study.directions))
        study.tell(trial, state=TrialState.FAIL)
        return
    study.tell(trial, [float(v) for v in values])


def requeue_orphans(study: Any, owner: str) -> None:
    """Mark FAIL the RUNNING trials whose sweeper, on this machine, is gone, and ask their parameters again."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(trial.user_attrs.get(OWNER_ATTR, ""))
        owner_host, _, pid = owner.rpartition(":")
        # Another machine's sweeper cannot be checked from here; it may be running, so its trials are left alone.
        if owner_host != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={OWNER_ATTR: owner}, skip_if_exists=False)
        log.info("trial %d was left running by a stopped sweep (%s); failed and asked again", trial.number, owner)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_results(study: Any, sweep_dir: Path) -> None:
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        log.warning("no trial of study %s completed; %s not written", study.study_name, RESULTS_FILE)
        return
    if len(study.directions) == 1:
        best = study.best_trial
        results: dict[str, Any] = {"name": "optuna", "best_params": best.params, "best_value": best.value,
                                   "best_trial": best.number}
        log.info("Best trial %d: %s = %s", best.number, best.params, best.value)
    else:
        results = {"name": "optuna", "directions": [d.name.lower() for d in study.directions],
                   "solutions": [{"trial": t.number, "params": t.params, "values": t.values}
                                 for t in study.best_trials]}
        log.info("Pareto front: %d trials", len(study.best_trials))
    OmegaConf.save(OmegaConf.create(results), sweep_dir / RESULTS_FILE)


__all__ = ["OptunaSearch", "RESULTS_FILE", "directions_of", "search_space"]
