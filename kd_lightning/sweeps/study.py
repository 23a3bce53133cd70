"""The Optuna study a search shares between its sweeper and its trials: storage, sampler and pruner by name.

A trial runs in another process than the sweeper (`hydra/launcher=parallel`, submitit, SLURM), so both open the
study through Optuna's storage, never through memory. The storage is named by one string:

- `sqlite:///<sweep dir>/optuna.db` — one machine (the default of `hparams_search=kd_optuna`);
- `journal:///<path>` — Optuna's journal file storage, for a filesystem that several nodes share;
- any other SQLAlchemy URL (`postgresql://user:pw@host/db`, `mysql+pymysql://...`) — an RDB server across nodes.

Samplers and pruners are chosen by name in the config (`sampler.name`, `pruner.name`), the other keys of the node
being the class's keyword arguments, so a misspelt name or option is refused before the first trial.
"""

from __future__ import annotations

import difflib
import inspect
import os
from pathlib import Path
from typing import Any, Mapping

from kd_lightning.errors import ConfigError

SWEEPER = "hydra_plugins.kd_optuna_sweeper.kd_optuna_sweeper.KDOptunaSweeper"  # hydra.sweeper._target_
JOURNAL = "journal://"
STORAGE_FORMS = ("sqlite:///<file> (one machine), journal:///<file on a shared filesystem> (several nodes), "
                 "or an RDB URL such as postgresql://user:password@host/database (several nodes; its driver, "
                 "e.g. psycopg2, installed)")

# name -> class path under optuna; classes are imported only when a study is opened.
SAMPLERS = {"tpe": "samplers.TPESampler", "random": "samplers.RandomSampler", "nsgaii": "samplers.NSGAIISampler",
            "nsgaiii": "samplers.NSGAIIISampler", "qmc": "samplers.QMCSampler", "gp": "samplers.GPSampler"}
PRUNERS = {"none": "pruners.NopPruner", "median": "pruners.MedianPruner",
           "successive_halving": "pruners.SuccessiveHalvingPruner", "hyperband": "pruners.HyperbandPruner",
           "percentile": "pruners.PercentilePruner"}
# Samplers that handle several objectives (Optuna's TPE does too; random is objective-blind).
MULTI_OBJECTIVE_SAMPLERS = ("tpe", "random", "nsgaii", "nsgaiii", "qmc")


def _optuna_class(path: str) -> type:
    import optuna

    module, name = path.split(".")
    return getattr(getattr(optuna, module), name)


def _build(kind: str, table: dict[str, str], node: Mapping[str, Any] | None, default: str) -> Any:
    options = dict(node or {})
    name = str(options.pop("name", default))
    if name not in table:
        closest = difflib.get_close_matches(name, list(table), n=1)
        hint = f" The closest is {closest[0]}." if closest else ""
        raise ConfigError(f"hydra.sweeper.{kind}.name={name} is not an Optuna {kind} this sweeper knows.{hint} Choose "
                          f"one of {', '.join(table)}, e.g. hydra.sweeper.{kind}.name={default}; the other keys of "
                          f"hydra.sweeper.{kind} are that class's keyword arguments.")
    cls = _optuna_class(table[name])
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ConfigError(f"hydra.sweeper.{kind} sets {', '.join(unknown)}, which optuna.{table[name]} does not take. "
                          f"Remove them, or use its options: {', '.join(sorted(accepted))}.")
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"hydra.sweeper.{kind} (optuna.{table[name]} with {options}) is refused by Optuna: "
                          f"{error}. Fix the option it names.") from None


def build_sampler(node: Mapping[str, Any] | None) -> Any:
    return _build("sampler", SAMPLERS, node, "tpe")


def build_pruner(node: Mapping[str, Any] | None) -> Any:
    return _build("pruner", PRUNERS, node, "none")


def pruner_name(node: Mapping[str, Any] | None) -> str:
    return str((node or {}).get("name", "none"))


def open_storage(url: str | None) -> Any:
    """An Optuna storage for `url` (see the module docstring); refused in one paragraph when it cannot be opened."""
    import optuna

    if not url:
        raise ConfigError(f"hydra.sweeper.storage is empty, but a search's trials run in their own processes and "
                          f"reach the study only through a storage. Set hydra.sweeper.storage to {STORAGE_FORMS}.")
    url = str(url)
    try:
        if url.startswith(JOURNAL):
            path = Path(url[len(JOURNAL):])
            path.parent.mkdir(parents=True, exist_ok=True)  # the sweep directory, before Hydra makes it
            from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

            # The open(O_EXCL) lock works on NFSv3+ and local disks alike; symlink locks need NFSv2 semantics.
            return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # SQLite serialises writers with a file lock; a trial process writing while the sweeper reads waits for it
        # instead of failing at once with "database is locked".
        engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except ConfigError:
        raise
    except Exception as error:  # a driver missing, a host unreachable, a malformed URL: the same fix applies
        raise ConfigError(f"hydra.sweeper.storage={url} cannot be opened ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}). Use {STORAGE_FORMS}; see "
                          f"docs/cluster.md.") from None


def check_storage(url: str | None) -> None:
    """Refuse a storage the sweep could not open, without creating it: a file storage's directory must be one that
    can be made and written; any other URL is opened (connecting to its server) and closed."""
    url = str(url or "")
    for prefix in (JOURNAL, "sqlite:///"):
        if url.startswith(prefix):
            directory = Path(url[len(prefix):]).parent.absolute()
            existing = next(path for path in (directory, *directory.parents) if path.exists())
            if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
                raise ConfigError(f"hydra.sweeper.storage={url} cannot be opened: {existing} is not a directory this "
                                  f"user can write, so {directory} cannot hold the study. Point the storage at a "
                                  f"writable place; it takes {STORAGE_FORMS} (docs/cluster.md).")
            return
    open_storage(url)


def load_study(storage: Any, study_name: str, pruner: Any = None) -> Any:
    import optuna

    # The sampler stays with the sweeper, which asks the trials; a trial process only reports and asks to prune.
    return optuna.load_study(study_name=study_name, storage=storage, pruner=pruner,
                             sampler=optuna.samplers.RandomSampler())


def trial_of(study: Any, number: int) -> Any:
    """The live `optuna.Trial` numbered `number` in `study`, for a trial process to report to."""
    import optuna

    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    return optuna.trial.Trial(study, trial_id)


__all__ = ["MULTI_OBJECTIVE_SAMPLERS", "PRUNERS", "SAMPLERS", "SWEEPER", "build_pruner", "build_sampler", "check_storage", "load_study",
           "open_storage", "pruner_name", "trial_of"]
