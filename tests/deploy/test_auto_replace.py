"""Automatic replacement: exact FC→Conv parity, the budgeted selector on planted numbers, local distillation."""

from __future__ import annotations

import itertools
import random

import pytest
import timm
import torch

from potpourri import PotpourriError
from potpourri.deploy import auto_replace as ar
from potpourri.deploy.auto_replace import (
    Candidate,
    DropBranch,
    TokenMlp,
    auto_replace,
    choose_under_budget,
    distill_locally,
    find_sites,
    mlp_to_conv,
)


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5
    ).eval()


def test_sites_are_found_with_their_shapes() -> None:
    sites = find_sites(tiny_vit(), torch.randn(1, 3, 32, 32))
    assert [s.path for s in sites] == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]
    assert all(s.tokens == 17 and s.dim == 32 and s.grid == (4, 4) and s.prefix == 1 for s in sites)


def test_fc_to_conv_rewrite_is_exact() -> None:
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    converted, diff = mlp_to_conv(model, x)
    assert diff <= 1e-5
    assert isinstance(converted.blocks[0].mlp, ar.ConvMlp) and isinstance(converted.blocks[0].mlp.fc1, torch.nn.Conv2d)
    assert isinstance(converted.blocks[1].norm2, ar.GridChannelNorm)  # LayerNorm → channel norm on the grid
    assert isinstance(model.blocks[0].mlp.fc1, torch.nn.Linear)  # the original is untouched


def _brute_force(options, budget):
    best = None
    for combo in itertools.product(*(range(len(o)) for o in options)):
        latency = sum(options[s][i].latency_ms for s, i in enumerate(combo))
        loss = sum(options[s][i].loss for s, i in enumerate(combo))
        if latency <= budget and (best is None or loss < best[0]):
            best = (loss, combo)
    return best


def test_selector_on_a_planted_problem() -> None:
    options = [
        [Candidate("orig", None, 0.0, 10.0), Candidate("fast", None, 0.5, 2.0), Candidate("drop", None, 1.0, 0.0)],
        [Candidate("orig", None, 0.0, 10.0), Candidate("fast", None, 0.1, 3.0), Candidate("drop", None, 1.0, 0.0)],
    ]
    # 13 ms: only one site can stay original; the cheaper loss is to speed up site 1 (0.1) and keep site 0
    assert choose_under_budget(options, 13.0) == [0, 1]
    assert choose_under_budget(options, 100.0) == [0, 0]  # a loose budget keeps everything
    assert choose_under_budget(options, 0.0) == [2, 2]
    with pytest.raises(PotpourriError, match="below the fastest possible"):
        choose_under_budget(options, -1.0)


def test_milp_agrees_with_enumeration_on_random_problems() -> None:
    rng = random.Random(0)
    for _ in range(20):
        options = [
            [Candidate(f"c{i}", None, rng.random(), rng.uniform(0, 5)) for i in range(rng.randint(2, 4))]
            for _ in range(rng.randint(2, 5))
        ]
        budget = sum(min(c.latency_ms for c in o) for o in options) + rng.uniform(0, 6)
        chosen = ar._choose_milp(options, budget)
        best_loss, _ = _brute_force(options, budget)
        assert sum(options[s][i].latency_ms for s, i in enumerate(chosen)) <= budget + 1e-6
        assert sum(options[s][i].loss for s, i in enumerate(chosen)) == pytest.approx(best_loss, abs=1e-6)


def test_local_distillation_fits_a_representable_target_and_dropping_costs_the_variance() -> None:
    torch.manual_seed(0)
    teacher = TokenMlp(16, 32).eval()
    inputs = torch.randn(80, 9, 16)
    with torch.no_grad():
        targets = teacher(inputs)
    student = TokenMlp(16, 32)
    assert distill_locally(student, inputs, targets, steps=400, lr=1e-2) < 0.05
    relative = float(targets[:16].pow(2).mean() / targets[:16].var())  # zero prediction: MSE / variance
    assert distill_locally(DropBranch(), inputs, targets) == pytest.approx(relative, rel=1e-5)


def test_auto_replace_respects_the_budget_and_keeps_everything_when_loose(monkeypatch: pytest.MonkeyPatch) -> None:
    # planted latencies (the real timer is tested in test_export_latency): originals 10 ms, candidates 1–3 ms
    planted = {"original": 10.0, "drop": 1.0, "teacher": 40.0, "student": 20.0}
    monkeypatch.setattr(ar, "_latency_ms", lambda modules, example, rounds: {n: planted.get(n, 3.0) for n in modules})
    model = tiny_vit()
    images = torch.randn(20, 3, 32, 32)
    loose = auto_replace(model, images, budget_ms=1e9, steps=5)
    assert all(row["chosen"] == "original" for row in loose.rows)
    with torch.no_grad():
        torch.testing.assert_close(loose.student(images), model(images))
    assert loose.agreement == 1.0 and loose.output_rel_error == 0.0
    # 4 sites: a 25 ms budget allows at most two originals (10 + 10 + 3 + 1 = 24 ≤ 25)
    tight = auto_replace(model, images, budget_ms=25.0, steps=5)
    assert sum(r["latency_ms"] for r in tight.rows) <= 25.0
    assert sum(row["chosen"] == "original" for row in tight.rows) <= 2
    replaced = [r["site"] for r in tight.rows if r["chosen"] != "original"]
    assert all(not isinstance(tight.student.get_submodule(p), type(model.get_submodule(p))) for p in replaced)
    assert tight.student(images).shape == (20, 5)


def test_global_distillation_brings_the_student_closer(monkeypatch: pytest.MonkeyPatch) -> None:
    planted = {"original": 10.0, "drop": 12.0, "teacher": 40.0, "student": 20.0}  # every site gets a trained op
    monkeypatch.setattr(ar, "_latency_ms", lambda modules, example, rounds: {n: planted.get(n, 3.0) for n in modules})
    model = tiny_vit()
    images = torch.randn(40, 3, 32, 32)
    local_only = auto_replace(model, images, budget_ms=13.0, steps=20)
    tuned = auto_replace(model, images, budget_ms=13.0, steps=20, global_steps=150)
    assert [r["chosen"] for r in tuned.rows] == [r["chosen"] for r in local_only.rows]  # same plan
    assert all(r["chosen"] not in ("original", "drop") for r in tuned.rows)
    assert tuned.output_rel_error < 0.8 * local_only.output_rel_error
