"""`kd-train`: the Hydra entry point. `python -m kd_lightning.train --help` lists the config groups."""

from __future__ import annotations

import sys

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from kd_lightning.errors import ConfigError


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from kd_lightning.pipeline import run  # after Hydra parsed the arguments, so --help stays fast

    try:
        results = run(cfg)
    except (ConfigError, InstantiationException) as error:
        # A user mistake: the message names the fix; a traceback would only bury it. Hydra wraps errors
        # raised inside constructors, so show the ConfigError itself when there is one.
        error = error.__cause__ if isinstance(error.__cause__, ConfigError) else error
        print(f"\nkd-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    return results["student_metrics"].get(cfg.get("optimized_metric", "test/acc"))


if __name__ == "__main__":
    main()
