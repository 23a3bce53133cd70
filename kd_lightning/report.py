"""The closing table of a run: teacher, student baseline and distilled student test accuracy."""

from __future__ import annotations

from typing import Iterable, Mapping


def format_table(rows: Iterable[tuple[str, str, Mapping[str, float]]], title: str = "results") -> str:
    rows = list(rows)
    top5 = any("test/acc_top5" in metrics for _, _, metrics in rows)
    header = ["role", "model", "test acc (%)"] + (["top-5 (%)"] if top5 else [])
    lines = [header]
    for role, model, metrics in rows:
        line = [role, model, _percent(metrics.get("test/acc"))]
        if top5:
            line.append(_percent(metrics.get("test/acc_top5")))
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    rule = "+".join("-" * (width + 2) for width in widths)
    text = [f"== {title} =="]
    for index, line in enumerate(lines):
        text.append(" | ".join(cell.ljust(width) for cell, width in zip(line, widths)))
        if index == 0:
            text.append(rule)
    return "\n".join(text)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"
