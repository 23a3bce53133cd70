"""What a hyperparameter search may optimise: a validation metric on data held out of the training set.

Choosing hyperparameters by a test metric, or by a "validation" metric computed on the test split (the
data modules' `val_fraction=0` convention), fits them to the test set, and the test accuracy then reported
for the winner is biased upwards. A plain `-m` grid (Hydra's basic sweeper) picks nothing, so it may report
test metrics for every job; any other sweeper (Optuna, Nevergrad, ...) optimises what the job returns.
"""

from __future__ import annotations

from typing import Any

from kd_lightning.errors import ConfigError

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
DEFAULT_METRIC = "val/acc"
HELD_OUT = ("data.val_fraction=0.1 (a seeded part of the training data held out for validation; keep data.seed "
            "fixed so every trial shares one split)")


# A multi-objective search's second objective: the size of the run's last network, which KD trades accuracy for.
SIZE_OBJECTIVES = {"student/params": "params", "student/flops": "flops"}


def objective_names(cfg: Any) -> list[str]:
    """The search's objectives in order: `optimized_metric`, then `second_objective` when set.

    An unknown second objective is refused here, before the first trial."""
    names = [str(cfg.get("optimized_metric") or DEFAULT_METRIC)]
    second = cfg.get("second_objective")
    if second is not None:
        if str(second) not in SIZE_OBJECTIVES:
            raise ConfigError(f"second_objective={second} is not an objective a trial can return. A multi-objective "
                              f"search trades {names[0]} against the student's size: set second_objective to one of "
                              f"{', '.join(SIZE_OBJECTIVES)} (with hydra.sweeper.direction=[maximize,minimize]), or "
                              f"remove it for a single objective.")
        names.append(str(second))
    return names


def objective_values(cfg: Any, results: dict) -> float | list[float] | None:
    """What a trial returns to the sweeper: its objective, or the list of its objectives, from its results."""
    names = objective_names(cfg)
    values = [results["student_metrics"].get(names[0])]
    for name in names[1:]:
        last = next(reversed(results["stages"].values()))  # the network the search is about
        size = next(iter(last.get("size", {}).values()), {})
        values.append(size.get(SIZE_OBJECTIVES[name]))
    return values[0] if len(values) == 1 else values


def is_search(sweeper_target: str | None) -> bool:
    return sweeper_target not in (None, BASIC_SWEEPER)


def check_search_objective(sweeper_target: str | None, cfg: Any, datamodule: Any) -> None:
    """Refuse a search whose objective is a test metric or whose validation set is the test split."""
    if not is_search(sweeper_target):
        return
    sweeper = str(sweeper_target).rsplit(".", 1)[-1]
    metric = str(cfg.get("optimized_metric") or "")
    if metric.startswith("test/"):
        raise ConfigError(f"optimized_metric={metric} is the objective of a {sweeper} search: choosing "
                          f"hyperparameters by a test metric fits them to the test set. Set "
                          f"optimized_metric={DEFAULT_METRIC} and validate on held-out training data with "
                          f"{HELD_OUT}; `kd-best <sweep dir>` then tests the chosen configuration alone.")
    if datamodule.validates_on_test:
        raise ConfigError(f"{type(datamodule).__name__} validates on the test split (data.val_fraction=0), so "
                          f"the {sweeper} search's objective optimized_metric={metric} is a test metric. Set "
                          f"{HELD_OUT}.")


__all__ = ["BASIC_SWEEPER", "DEFAULT_METRIC", "SIZE_OBJECTIVES", "check_search_objective", "is_search",
           "objective_names", "objective_values"]
