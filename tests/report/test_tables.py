"""The one Markdown table writer (report/tables.py)."""

from __future__ import annotations

import pytest

from potpourri.report.tables import markdown_table


def test_markdown_table_layout() -> None:
    text = markdown_table(["arm", "acc"], [["linear", "0.281"], ["full", 0.5]])
    assert text.splitlines() == ["| arm | acc |", "|---|---|", "| linear | 0.281 |", "| full | 0.5 |"]


def test_markdown_table_refuses_a_ragged_row() -> None:
    with pytest.raises(ValueError, match="3 cells for 2 columns"):
        markdown_table(["a", "b"], [[1, 2, 3]])
