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


def test_mean_std_matches_statistics_and_shows_one_seed_alone() -> None:
    import statistics

    from potpourri.report.tables import mean_std

    values = [0.31, 0.42, 0.35]
    assert mean_std(values) == f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
    assert mean_std([0.5], digits=2) == "0.50"
