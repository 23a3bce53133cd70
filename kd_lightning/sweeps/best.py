"""`kd-best <sweep dir>`: train a finished search's best configuration once more and test it, the only test.

Search trials (`hparams_search=...`) evaluate nothing on the test split, so the test accuracy reported
for a search belongs to one configuration, chosen on held-out data. The command rebuilds that
configuration from what the sweep wrote — a trial's overrides (`<trial>/.hydra/overrides.yaml`) with the
searched keys set to the best trial's parameters (`optimization_results.yaml`; for a multi-objective search,
those of the Pareto-front trial chosen with `--trial N`) — drops the search config, and runs it as a plain `kd-train`
job into `<sweep dir>/best`. Training is seeded, so the run repeats the best trial (its `val/acc` is
printed next to the trial's) and its cached teacher and baseline are reused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from kd_lightning.errors import ConfigError

RESULTS_FILE = "optimization_results.yaml"


def best_overrides(sweep_dir: Path, trial: int | None = None) -> tuple[list[str], float]:
    """The `kd-train` overrides of the search's best trial (or of `trial`, one of a multi-objective search's Pareto
    front), and that trial's (first) objective value."""
    results_file = sweep_dir / RESULTS_FILE
    trials = sorted(path for path in sweep_dir.glob("*/.hydra/overrides.yaml") if path.parts[-3] != "best")
    if not results_file.is_file() or not trials:
        raise ConfigError(f"{sweep_dir} holds no finished search ({RESULTS_FILE} is written when a `kd-train "
                          f"-m hparams_search=...` study ends, next to its trials' directories). Point kd-best at "
                          f"that sweep's directory (hydra.sweep.dir), or finish the study by rerunning it there.")
    results = OmegaConf.load(results_file)
    if "best_params" in results and trial is None:
        best, value = {str(key): v for key, v in results.best_params.items()}, float(results.best_value)
    elif "best_params" in results:
        raise ConfigError(f"--trial {trial} picks one of a multi-objective study's Pareto front, but {results_file} "
                          f"has a single best trial. Drop --trial.")
    else:
        front = {int(solution.trial): solution for solution in results.get("solutions") or []}
        if trial not in front:
            choices = "; ".join(f"trial {number}: values {list(solution['values'])}"
                                for number, solution in sorted(front.items()))
            raise ConfigError(f"{results_file} has no single best trial: a multi-objective study keeps a Pareto "
                              f"front ({choices or 'empty'}). Choose one of its trials: "
                              f"`kd-best {sweep_dir} --trial <number>`.")
        best, value = {str(key): v for key, v in front[trial].params.items()}, float(front[trial]["values"][0])
    # Any trial's overrides: they differ only in the searched keys, which are replaced by the best values.
    task = [str(text) for text in OmegaConf.load(trials[0])]
    kept = [text for override, text in zip(OverridesParser.create().parse_overrides(task), task)
            if override.key_or_group not in best and override.key_or_group != "hparams_search"]
    return [*kept, *(f"{key}={value}" for key, value in best.items())], value


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print("usage: kd-best <sweep dir> [--trial N] [kd-train overrides...]", file=sys.stderr)
        sys.exit(2)
    sweep_dir, extra, trial = Path(argv[0]), argv[1:], None
    if extra[:1] == ["--trial"] and len(extra) > 1 and extra[1].isdigit():
        trial, extra = int(extra[1]), extra[2:]
    try:
        overrides, best_value = best_overrides(sweep_dir, trial)
    except ConfigError as error:
        print(f"kd-best: error: {error}", file=sys.stderr)
        sys.exit(2)
    run_dir = sweep_dir / "best"
    from kd_lightning import train

    print(f"kd-best: kd-train {' '.join(overrides + extra)}", file=sys.stderr)
    sys.argv = ["kd-train", *overrides, *extra, f"hydra.run.dir={run_dir}"]
    train.main()
    results = json.loads((run_dir / "results.json").read_text())
    metrics = results["student_metrics"]
    metric = OmegaConf.load(run_dir / ".hydra" / "config.yaml").get("optimized_metric", "val/acc")
    print(f"kd-best: best trial {metric}={best_value:.4f}; rerun {metric}={metrics.get(metric, float('nan')):.4f}; "
          + " ".join(f"{key}={value:.4f}" for key, value in sorted(metrics.items()) if key.startswith("test/")))


if __name__ == "__main__":
    main()
