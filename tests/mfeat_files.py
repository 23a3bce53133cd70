"""Tiny stand-ins for the UCI Multiple Features files: the real layout (header row, the source's feature count,
the class label last, classes in order), a few rows per class, written into a test's tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kd_lightning.data.mfeat import SOURCES, mfeat_file_name

# The first morphology feature is constant, as a check that constant features standardise to 0, not NaN.
CONSTANT_FEATURE = ("morphology", 0)


def write_tiny_mfeat(directory: Path, rows_per_class: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the six files into `directory` (created) and return each source's rows: class-dependent means
    plus noise, on a scale and offset of their own per feature so standardisation has something to undo."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), rows_per_class)
    written = {}
    for name, (_, width) in SOURCES.items():
        centres = rng.normal(size=(10, width))
        scale, offset = rng.uniform(0.5, 20.0, size=width), rng.uniform(-50, 50, size=width)
        rows = (centres[labels] + 0.5 * rng.normal(size=(len(labels), width))) * scale + offset
        if name == CONSTANT_FEATURE[0]:
            rows[:, CONSTANT_FEATURE[1]] = 3.0
        header = ",".join(str(i) for i in range(width)) + ",0"
        table = np.column_stack([rows, labels])
        np.savetxt(directory / mfeat_file_name(name), table, delimiter=",", header=header, comments="",
                   fmt=["%.6f"] * width + ["%d"])
        written[name] = rows
    return written
