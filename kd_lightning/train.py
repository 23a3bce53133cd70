"""`kd-train`: the Hydra entry point. `python -m kd_lightning.train --help` lists the config groups."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from kd_lightning.errors import ConfigError


# An absolute path: relative ones are resolved as a Python package when run as the `kd-train` console script.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from kd_lightning.pipeline import run  # after Hydra parsed the arguments, so --help stays fast

    quiet_lightning_console()
    try:
        results = run(cfg)
    except (ConfigError, InstantiationException) as error:
        # A user mistake: the message names the fix; a traceback would only bury it. Hydra wraps errors
        # raised inside constructors, so show the ConfigError itself when there is one.
        error = error.__cause__ if isinstance(error.__cause__, ConfigError) else error
        print(f"\nkd-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    return results["student_metrics"].get(cfg.get("optimized_metric", "test/acc"))


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
