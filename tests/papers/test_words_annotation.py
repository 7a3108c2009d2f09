"""``reproduce words-annotation --quick``: the whole path runs, and the sentence of a *true* mask reads back as
its own words (a check the real run also reports)."""

from __future__ import annotations

import json

import pytest

from potpourri.papers.registry import run_experiment

pytestmark = [pytest.mark.slow, pytest.mark.one_thread]


def test_words_annotation_quick_reads_true_masks_back_exactly(tmp_path) -> None:
    run = run_experiment("words-annotation", quick=True, out=str(tmp_path / "words"))
    summary = json.loads((run.path / "summary.json").read_text())
    assert "| words -> box |" in (run.path / "results.md").read_text()
    assert all(summary["description_true_masks"][f] == 1.0 for f in ("kind", "cell", "shape", "size", "extent"))
    for name, value in summary["prompts"].items():
        if isinstance(value, float):
            assert 0.0 <= value <= 1.0, name
