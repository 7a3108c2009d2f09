"""AutoVP: padding prompt, trainable resize, label mappings, successive halving (tiny random models, planted cases)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from potpourri.core.errors import PotpourriError
from potpourri.models.visual_prompt import cooccurrence, frequency_mapping
from potpourri.tune.strategies import get_strategy
from potpourri.tune.visual_prompt import (
    PaddingPrompt,
    VPConfig,
    build_visual_prompt,
    semantic_mapping,
    successive_halving,
    train_visual_prompt,
)
from tests.tune.tune_testkit import tiny_model

NUM_SOURCE = 12


def _pixels(n: int = 24, size: int = 16, num_classes: int = 3, seed: int = 0) -> TensorDataset:
    """Images in [0, 1] whose colour channel carries the label."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    x = 0.2 * torch.rand(n, 3, size, size, generator=g)
    x[torch.arange(n), labels] += 0.6
    return TensorDataset(x, labels)


def test_padding_prompt_keeps_the_centre_and_only_the_border_is_learnable():
    prompt = PaddingPrompt(32, 8, scale=1.0)
    with torch.no_grad():
        prompt.delta.normal_()  # a non-trivial prompt
    images = torch.rand(2, 3, 16, 16)
    canvas = prompt.canvas(images)
    resized = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(canvas[:, :, 8:24, 8:24], resized, atol=1e-6, rtol=0)  # image untouched
    border = torch.ones(32, 32, dtype=torch.bool)
    border[8:24, 8:24] = False
    torch.testing.assert_close(canvas[:, :, border], torch.sigmoid(prompt.delta)[:, border].expand(2, -1, -1))
    canvas.sum().backward()  # the gradient of delta vanishes on the image and not on the border
    assert prompt.delta.grad[:, ~border].abs().max() == 0
    assert prompt.delta.grad[:, border].abs().min() > 0


def test_trainable_scale_zooms_the_image_and_shrinks_the_prompt():
    prompt = PaddingPrompt(32, 8, scale=1.5)  # a 16px image zoomed to 24px
    assert prompt.visible_side() == 24 and prompt.mask()[0, 4:28, 4:28].sum() == 0 and prompt.mask()[0, 3, 3] == 1
    images = torch.rand(1, 3, 16, 16)
    prompt.canvas(images).sum().backward()
    assert prompt.scale.grad is not None and prompt.scale.grad.abs() > 0  # the scale learns through grid_sample
    fixed = PaddingPrompt(32, 8, scale=1.5, learn_scale=False)
    assert "scale" not in dict(fixed.named_parameters())


def test_only_prompt_and_mapping_train_and_the_source_stays_bit_identical():
    source = tiny_model(num_classes=NUM_SOURCE)
    data = _pixels()
    model = build_visual_prompt(source, 3, VPConfig("fully", width=4), canvas=24)
    before = copy.deepcopy(source.state_dict())
    prompt_before = model.prompt.delta.detach().clone()
    plan = get_strategy("visual-prompt").prepare(model, lr=0.05)
    assert set(plan.trainable_names) == {"prompt.delta", "prompt.scale", "mapping.fc.weight", "mapping.fc.bias"}
    train_visual_prompt(model, data, epochs=2, lr=0.05, batch_size=8)
    for key, value in source.state_dict().items():  # weights and BN running stats
        assert torch.equal(value, before[key]), f"source '{key}' changed"
    assert not torch.equal(model.prompt.delta, prompt_before)


def test_visual_prompt_strategy_rejects_a_plain_model():
    with pytest.raises(PotpourriError, match="VisualPromptModel"):
        get_strategy("visual-prompt").prepare(tiny_model(), lr=0.1)


def test_freqmap_picks_the_planted_sources_one_to_one():
    # planted confusion: target 0 -> source 5, target 1 -> source 2; target 2's top source is also 5 (taken by
    # the larger count of target 0), so it must fall back to its second choice, source 7.
    counts = torch.zeros(NUM_SOURCE, 3, dtype=torch.long)
    counts[5, 0], counts[2, 1], counts[5, 2], counts[7, 2], counts[9, 0] = 30, 20, 25, 10, 3
    assert frequency_mapping(counts).flatten().tolist() == [5, 2, 7]
    two = frequency_mapping(counts, num_map=2)  # second picks: target 0 -> 9; the rest from unused, lowest first
    assert two.tolist() == [[5, 9], [2, 0], [7, 1]]
    preds, labels = torch.tensor([5, 5, 2, 7]), torch.tensor([0, 2, 1, 2])
    assert cooccurrence(preds, labels, NUM_SOURCE, 3)[5].tolist() == [1, 0, 1]


def test_itermap_remapping_is_one_to_one_and_follows_the_source():
    torch.manual_seed(0)
    source = tiny_model(num_classes=NUM_SOURCE)
    data = _pixels(n=30)
    model = build_visual_prompt(source, 3, VPConfig("iter", width=4), canvas=24, train_data=data)
    history = train_visual_prompt(model, data, epochs=3, lr=0.1, batch_size=10, cfg=VPConfig("iter", width=4))
    index = model.mapping.index
    assert len(history) == 3 and index.unique().numel() == index.numel() == 3  # one-to-one after re-mapping
    with torch.no_grad():  # independent expectation: the greedy assignment on counts of the current predictions
        preds = model.source_logits(data.tensors[0]).argmax(1)
    counts = cooccurrence(preds, data.tensors[1], NUM_SOURCE, 3)
    assert torch.equal(model.remap_frequency(data), frequency_mapping(counts))


def test_semantic_map_picks_the_nearest_name_on_a_hand_made_embedding():
    source = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.9, 0.1, 0]])  # 4 "ImageNet" names
    target = torch.tensor([[0.8, 0.2, 0.0], [0.95, 0.0, 0.05], [0.0, 0.1, 1.0]])
    # target 0 is nearest source 3, target 1 nearest source 0, target 2 nearest source 2
    assert semantic_mapping(source, target).flatten().tolist() == [3, 0, 2]
    clash = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0]])  # both nearest to source 0: the second takes source 3
    assert semantic_mapping(source, clash).flatten().tolist() == [0, 3]


def test_index_mapping_averages_the_mapped_source_logits():
    model = build_visual_prompt(
        tiny_model(num_classes=NUM_SOURCE),
        2,
        VPConfig("freq", width=4, num_map=2),
        canvas=24,
        train_data=_pixels(num_classes=2),
    )
    logits = torch.randn(5, NUM_SOURCE)
    index = model.mapping.index
    expected = torch.stack([logits[:, index[k]].mean(1) for k in range(2)], 1)
    torch.testing.assert_close(model.mapping(logits), expected)


def test_successive_halving_keeps_a_third_each_rung_and_finds_the_best():
    quality = torch.linspace(0, 1, 24)[torch.randperm(24, generator=torch.Generator().manual_seed(0))].tolist()
    calls = []

    def score(i: int, budget: int) -> float:
        calls.append((i, budget))
        return quality[i] * (1 - 0.5 / budget)  # more budget, higher scores, the same order

    result = successive_halving(24, score, min_budget=1, eta=3)
    assert [len(r["scores"]) for r in result.rungs] == [24, 8, 2]
    assert [r["budget"] for r in result.rungs] == [1, 3, 9]
    for rung in result.rungs:
        ranked = sorted(rung["scores"], key=lambda i: -rung["scores"][i])
        assert rung["kept"] == ranked[: max(1, len(rung["scores"]) // 3)]
    assert result.best == max(range(24), key=quality.__getitem__)
    assert len(calls) == 24 + 8 + 2


def test_successive_halving_with_eta_2():
    result = successive_halving(8, lambda i, b: -abs(i - 5), min_budget=2, eta=2)
    assert [len(r["scores"]) for r in result.rungs] == [8, 4, 2]
    assert [r["budget"] for r in result.rungs] == [2, 4, 8]
    assert result.best == 5


def test_semantic_mapping_needs_names_and_encoder():
    with pytest.raises(PotpourriError, match="text_encoder"):
        build_visual_prompt(tiny_model(num_classes=NUM_SOURCE), 3, VPConfig("semantic", width=4), canvas=24)
    with pytest.raises(PotpourriError, match="unknown label mapping"):
        VPConfig("random")


def test_bad_prompt_width_is_one_line_error():
    with pytest.raises(PotpourriError, match="width"):
        PaddingPrompt(16, 8)
