"""Markdown tables for ``results.md`` files and terminal summaries: one writer, every experiment's cells."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["markdown_table"]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are written with ``str`` (format numbers before passing them).

    Example:
        markdown_table(["arm", "acc"], [["linear", "0.281"]])  # '| arm | acc |\\n|---|---|\\n| linear | 0.281 |'
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"table row has {len(row)} cells for {len(header)} columns: {list(row)}")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)
