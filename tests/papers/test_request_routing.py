"""``reproduce request-routing``: its dev set is disjoint from the held-out phrasings, and the quick run scores the
keyword baseline exactly as routing the same phrasings by hand does."""

from __future__ import annotations

import json

import pytest

from potpourri.papers.request_routing import DEV_REQUESTS
from potpourri.vlm.router import Call, KeywordRouter, load_heldout_requests


def test_dev_requests_are_grammatical_and_not_held_out() -> None:
    assert all(Call.parse(call) is not None for _, call in DEV_REQUESTS)
    assert not {t.lower() for t, _ in DEV_REQUESTS} & {t.lower() for t, _ in load_heldout_requests()}


@pytest.mark.slow
@pytest.mark.one_thread
def test_request_routing_quick_scores_the_baseline_by_hand(tmp_path) -> None:
    from potpourri.papers.registry import run_experiment

    run = run_experiment("request-routing", quick=True, out=str(tmp_path / "route"))
    rows = json.loads((run.path / "summary.json").read_text())["rows"]
    keywords = next(r for r in rows if r["router"].startswith("keywords"))
    heldout = load_heldout_requests()[:3]
    by_hand = sum(KeywordRouter().route(t) == c for t, c in heldout) / 3
    assert keywords["held-out_exact"] == pytest.approx(by_hand)
    lm_rows = [r for r in rows if not r["router"].startswith("keywords")]
    assert lm_rows and all(Call.parse(c) is not None for r in lm_rows for c in r["calls"])  # always grammatical
