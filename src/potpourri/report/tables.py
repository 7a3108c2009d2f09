"""Markdown tables for ``results.md`` files and terminal summaries: one writer, every experiment's cells."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["markdown_table", "mean_std"]


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


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` (sample std) of per-seed values, or the single value alone: ``mean_std([0.5, 0.7]) == '0.600 ±
    0.141'``."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
