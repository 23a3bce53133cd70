"""What a trial stopped by the search's pruner leaves: an exception out of its fit, a record, a value for the sweeper.

Kept free of torch and Lightning so that the sweeper and `kd-report` read it without loading them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PRUNED_FILE = "pruned.json"


@dataclass(frozen=True)
class PrunedTrial:
    """What a pruned job returns to the sweeper (pickled across processes by parallel launchers)."""

    trial: int
    epoch: int
    value: float


class TrialStopped(Exception):
    def __init__(self, pruned: PrunedTrial) -> None:
        super().__init__(f"trial {pruned.trial} pruned after epoch {pruned.epoch} ({pruned.value:.4f})")
        self.pruned = pruned


def record_pruned(output_dir: Path, record: dict[str, Any], pruned: PrunedTrial) -> None:
    """`<job>/pruned.json`: the job's identity and where the pruner stopped it, for `kd-report`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / PRUNED_FILE).write_text(json.dumps({**record, "pruned": asdict(pruned)}, indent=2))


__all__ = ["PRUNED_FILE", "PrunedTrial", "TrialStopped", "record_pruned"]
