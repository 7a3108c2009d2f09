"""``reproduce seed-speaks --quick``: the three tokenizers, both pixel decoders and the code sampler run end to end;
the chance levels equal a full enumeration and the nearest-other-image score a brute-force search; the aligned arms
alone have a caption → image score; every score is a fraction of the held-out images."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from potpourri.papers.seed_speaks import chance_same_label, nearest_other_same

pytestmark = [pytest.mark.slow, pytest.mark.one_thread]


def test_chance_levels_equal_an_enumeration() -> None:
    labels = ["a", "a", "b", "c", "c", "c"]
    pairs = [(i, j) for i, j in itertools.permutations(range(6), 2)]
    assert chance_same_label(labels) == pytest.approx(sum(labels[i] == labels[j] for i, j in pairs) / len(pairs))
    every = list(itertools.product(range(6), repeat=2))
    expected = sum(labels[i] == labels[j] for i, j in every) / len(every)
    assert chance_same_label(labels, others_only=False) == pytest.approx(expected)


def test_nearest_other_same_equals_a_brute_force_search() -> None:
    g = torch.Generator().manual_seed(0)
    emb, gallery = torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)
    labels = ["a", "b", "c"] * 3
    for keys in (emb, gallery):
        hits = []
        for i in range(9):
            sims = [float(F.cosine_similarity(emb[i], keys[j], dim=0)) if j != i else -2.0 for j in range(9)]
            hits.append(labels[int(np.argmax(sims))] == labels[i])
        assert nearest_other_same(emb, labels, None if keys is emb else keys) == pytest.approx(np.mean(hits))


def test_seed_speaks_quick_runs_every_arm_and_writes_images(tmp_path) -> None:
    from potpourri.papers.registry import run_experiment

    run = run_experiment("seed-speaks", quick=True, out=str(tmp_path / "run"), seed=1)
    summary = json.loads((run.path / "summary.json").read_text())
    arms = {r["arm"]: r for r in summary["rows"]}
    assert set(arms) == {"no text", "text on last query", "text on codes"} and summary["config"]["seed"] == 1
    assert "caption_to_image_kind" not in arms["no text"]
    assert all("caption_to_image_kind" in arms[a] for a in ("text on last query", "text on codes"))
    n = 14  # 2 surfaces x 7 kinds x 1 held-out image
    for row in arms.values():
        for key in ("neighbour_kind", "neighbour_surface", "codes_kind", "codes_surface"):
            assert abs(row[key] * n - round(row[key] * n)) < 1e-9
    assert {r["decoder"] for r in summary["pixels"]} == {"codes only", "codes + colour tokens"}
    assert all(r["frechet_lite0"] >= 0 and r["psnr"] > 0 for r in summary["pixels"])
    generated = {r["images"]: r for r in summary["generation"]["rows"]}["generated from test captions"]
    assert 0 <= generated["kind_classifier"] <= 1 and generated["frechet_lite0"] >= 0
    assert 1 <= summary["generation"]["distinct"] <= n
    written = {r["images"]: r for r in summary["generation"]["rows"]}["written by tiny from test captions"]
    assert 0 <= written["tokenizer_reads_kind"] <= 1 and written["frechet_lite0"] >= 0  # the LM's codes decoded
    assert 1 <= summary["generation"]["lm_distinct"] <= n
    folder = run.path / "text-on-codes"
    for part in ("pixel-decoder", "pixel-decoder-colour", "code-sampler", "lm-writer"):
        assert (folder / part / "last.json").is_file(), part  # each model checkpointed
