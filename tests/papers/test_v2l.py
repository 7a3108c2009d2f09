"""``reproduce v2l --quick``: the report's invariants (the LLM stays frozen, chance is 1/7, accuracies are
fractions of the queries, local tokens are real vocabulary words)."""

from __future__ import annotations

import json

import pytest

from potpourri.data.synth import CLASSES
from potpourri.papers.registry import run_experiment

pytestmark = [pytest.mark.slow, pytest.mark.one_thread]


def test_v2l_quick_keeps_the_llm_frozen_and_reports_fractions(tmp_path) -> None:
    run = run_experiment("v2l", quick=True, out=str(tmp_path / "v2l"))
    results = (run.path / "results.md").read_text()
    summary = json.loads((run.path / "summary.json").read_text())
    assert "| k per class | in-context (global+local) | linear probe (Lite0) | chance |" in results
    assert "our clip_vit_tiny_minilm" in results and "not OpenAI's CLIP" in results  # the towers are named
    assert summary["distinct_global_words_used"] >= 3 and summary["distinct_global_word_sets"] >= 1  # top-3: distinct
    assert summary["llm_embeddings_bit_identical"] is True
    assert summary["chance"] == pytest.approx(1 / len(CLASSES))
    for row in summary["episodes"]:
        queries = len(CLASSES)  # the quick run asks one query per class
        for key in ("global+local", "linear_probe"):
            assert abs(row[key] * queries - round(row[key] * queries)) < 1e-9
    assert 1 <= summary["distinct_local_words_used"] <= summary["vocabulary_subset"]
    assert (run.path / "tokenizer" / "last.json").is_file()  # the Trainer checkpointed the tokenizer
