"""The benchmark scripts' sections of BENCHMARKS.md: each between its own `<!-- benchmark:<name>:start/end -->`
markers, so a rerun of one benchmark replaces its section and leaves the others' alone."""

from __future__ import annotations

from pathlib import Path


def write_marked_section(markdown: Path, name: str, body: str) -> str:
    """Replace (or append) section `name` of `markdown` with `body`; the section as written, markers included."""
    start, end = f"<!-- benchmark:{name}:start -->", f"<!-- benchmark:{name}:end -->"
    section = f"{start}\n{body.rstrip(chr(10))}\n{end}"
    text = markdown.read_text() if markdown.is_file() else "# Benchmarks\n"
    if start in text and end in text[text.index(start):]:
        text = text[:text.index(start)] + section + text[text.index(end, text.index(start)) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    markdown.write_text(text)
    return section
