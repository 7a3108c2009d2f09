"""``reproduce seed-speaks --quick``: both arms run end to end; the chance levels equal a full enumeration; the
text-aligned arm alone has a caption → image score; every score is a fraction of the held-out images."""

from __future__ import annotations

import itertools
import json

import pytest

from potpourri.papers.seed_speaks import chance_same_label

pytestmark = [pytest.mark.slow, pytest.mark.one_thread]


def test_chance_levels_equal_an_enumeration() -> None:
    labels = ["a", "a", "b", "c", "c", "c"]
    pairs = [(i, j) for i, j in itertools.permutations(range(6), 2)]
    assert chance_same_label(labels) == pytest.approx(sum(labels[i] == labels[j] for i, j in pairs) / len(pairs))
    every = list(itertools.product(range(6), repeat=2))
    expected = sum(labels[i] == labels[j] for i, j in every) / len(every)
    assert chance_same_label(labels, others_only=False) == pytest.approx(expected)


def test_seed_speaks_quick_runs_both_arms(tmp_path) -> None:
    from potpourri.papers.registry import run_experiment

    run = run_experiment("seed-speaks", quick=True, out=str(tmp_path / "run"), seed=1)
    summary = json.loads((run.path / "summary.json").read_text())
    arms = {r["arm"]: r for r in summary["rows"]}
    assert set(arms) == {"no text", "text-aligned"} and summary["config"]["seed"] == 1
    assert "caption_to_image_kind" in arms["text-aligned"] and "caption_to_image_kind" not in arms["no text"]
    n = 14  # 2 surfaces x 7 kinds x 1 held-out image
    for row in arms.values():
        for key in ("neighbour_kind", "neighbour_surface"):
            assert abs(row[key] * n - round(row[key] * n)) < 1e-9
        assert row["frechet_lite0"] >= 0 and row["psnr"] > 0
    assert (run.path / "text-aligned" / "pixel-decoder" / "last.json").is_file()  # the decoder checkpointed
