"""The layer-proxy study: cached-prefix training equals whole-model training, the agreement metrics are what they
say, the feature-change proxy measures what it claims, and the quick run writes a consistent summary."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
import torch.nn as nn

from potpourri.papers.layer_proxies import agreement, cached_inputs, tune_single_block
from potpourri.tune.layer_select import proxy_scores, rank_correlation
from potpourri.tune.multitask import BlockProgram
from potpourri.tune.strategies import get_strategy
from potpourri.tune.trainer import TuneConfig, fit, train
from tests.tune.test_layer_select import PlantedNet, planted_data
from tests.tune.tune_testkit import colour_data, tiny_model


@pytest.mark.parametrize("block", ["blocks.0.1", "neck"])
def test_training_on_cached_prefix_activations_equals_training_the_whole_model(block):
    base, data = tiny_model(), colour_data(24)
    cfg = {"epochs": 2, "lr": 5e-2, "batch_size": 8, "seed": 3, "progress": False}
    reference = fit(copy.deepcopy(base), data, None, "subtuning", blocks=[block], **cfg).model

    program = BlockProgram(base)
    start = program.branch_point([block])
    inputs = cached_inputs(base, program, data.tensors[0], [start])[start]
    tuned = tune_single_block(base, program, block, inputs, data.tensors[1], TuneConfig(**cfg)).model
    for (name, expected), actual in zip(reference.state_dict().items(), tuned.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)
    prefix = "conv_head" if block == "neck" else block
    moved = [
        k for k, v in tuned.state_dict().items() if k.startswith(prefix) and not torch.equal(v, base.state_dict()[k])
    ]
    assert moved  # the block really trained, so the equality above is not between two untouched models


def test_agreement_metrics_on_planted_scores():
    oracle = {"a": 0.9, "b": 0.7, "c": 0.8, "d": 0.1, "e": 0.5}
    proxy = {"a": 1.0, "b": 5.0, "c": 3.0, "d": 0.0, "e": 2.0}  # picks b (0.7), then c, e
    result = agreement(proxy, oracle)
    # ranks: oracle a1 c2 b3 e4 d5, proxy b1 c2 e3 a4 d5 -> d² = 9+0+4+1+0 = 14 -> 1 - 6*14/(5*24) = 0.3
    assert result["spearman"] == pytest.approx(0.3)
    # pairs concordant 6, discordant 4 -> tau = 0.2
    assert result["kendall"] == pytest.approx(0.2)
    assert result["pick"] == "b" and not result["top1_hit"]
    assert result["top3_overlap"] == pytest.approx(2 / 3)  # {b, c, e} vs {a, c, b}
    assert result["pick_acc"] == pytest.approx(0.7) and result["regret"] == pytest.approx(0.2)
    assert agreement(oracle, oracle)["top1_hit"] and agreement(oracle, oracle)["regret"] == 0.0
    assert rank_correlation(proxy, oracle, method="kendall") == pytest.approx(0.2)


def test_feature_change_is_zero_upstream_of_a_constant_block_and_matches_a_hand_computation():
    model, data = PlantedNet(k=2), planted_data(32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = proxy_scores(model, data, method="feature_change", batches=1, batch_size=8, lr=1e-2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    # the constant block cuts every gradient upstream, so one AdamW step leaves those blocks exactly where they were
    assert scores["stem"] == scores["blocks.0"] == scores["blocks.1"] == 0.0
    assert scores["blocks.2"] > 0 and scores["blocks.3"] > 0 and scores["head"] > 0

    # hand computation for blocks.3: the same AdamW step, then ‖B'(h) − B(h)‖ / ‖B(h)‖ on the same batch
    order = torch.randperm(32, generator=torch.Generator().manual_seed(0))[:8]
    trained = copy.deepcopy(model)
    plan = get_strategy("full-adamw").prepare(trained, lr=1e-2)
    subset = torch.utils.data.TensorDataset(*(t[order] for t in data.tensors))
    train(trained, subset, None, plan, TuneConfig(epochs=1, batch_size=8, lr=1e-2, shuffle=False, progress=False))
    with torch.no_grad():
        x = data.tensors[0][order[:8]]
        h = model.blocks[:3](torch.relu(model.stem(x)))  # the pretrained input of blocks.3
        old, new = model.blocks[3](h), trained.blocks[3](h)
    assert scores["blocks.3"] == pytest.approx(((new - old).norm() / old.norm()).item(), rel=1e-5)


def test_cached_inputs_are_the_activations_entering_each_block():
    model = tiny_model().eval()
    program = BlockProgram(model)
    x = colour_data(10).tensors[0]
    starts = [program.branch_point(["blocks.1.0"]), program.branch_point(["head"])]
    cached = cached_inputs(model, program, x, starts, batch_size=4)
    with torch.no_grad():
        stem = torch.relu(model.bn1(model.conv_stem(x)))
        expected_block = model.blocks[0](stem)
        expected_head = torch.relu(model.bn2(model.conv_head(model.blocks(stem)))).mean((2, 3))
    torch.testing.assert_close(cached[starts[0]], expected_block)
    torch.testing.assert_close(cached[starts[1]], expected_head)
    assert isinstance(model.classifier, nn.Linear)


@pytest.mark.slow
def test_quick_layer_proxy_study_writes_a_consistent_summary(tmp_path):
    from potpourri.papers.layer_proxies import run

    result = run(quick=True, out=str(tmp_path / "run"))
    summary = result.read_summary()
    oracle, per_seed = summary["oracle"], summary["profile_per_seed"]
    for block, value in oracle.items():
        assert value == pytest.approx(statistics.fmean(per_seed[seed][block] for seed in per_seed))
    methods = {row["method"]: row for row in summary["methods"]}
    assert {"grad_ratio", "fisher", "feature_change", "greedy round 1 (2-fold CV)"} <= set(methods)
    depth = methods["depth (later is better)"]
    assert depth["pick"] == summary["candidates"][-1]
    for name, row in methods.items():
        assert row["pick"] in summary["candidates"] and row["pick_acc"] == pytest.approx(oracle[row["pick"]]), name
    assert (result.path / "profile.png").stat().st_size > 1000
    assert (result.path / "results.md").read_text().startswith("| method | Spearman")
