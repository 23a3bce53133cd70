"""Reading an offline W&B run back: the records of its `.wandb` file, as `wandb sync` would upload them."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def wandb_records(run_dir: Path):
    """The protobuf records of an offline run's `.wandb` file (W&B's leveldb-style log: 32 KiB blocks of
    chunks with a 7-byte header: crc32, length, type; FULL=1 or FIRST..LAST=2..4)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if (left := 32768 - position % 32768) < 7:
            position += left
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def finished_records(run_dir: Path, timeout: float = 60.0) -> list:
    """All records once the run's `exit` record is on disk: W&B's service writes the file asynchronously, so
    right after `run.finish()` it may still be short on a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(run_dir))
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def run_record(run_dir: Path):
    """The run's own record: project, group (`run_group`), job type, name."""
    return next(record.run for record in finished_records(run_dir) if record.WhichOneof("record_type") == "run")


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's config: what `wandb.init` set and every later `config.update` (Lightning's log_hyperparams)."""
    config: dict[str, Any] = {}
    for record in finished_records(run_dir):
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in updates})
    return config
