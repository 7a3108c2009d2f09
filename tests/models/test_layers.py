"""Shared loss pieces (models/layers.py) against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from potpourri.models.layers import binary_focal_loss, dice_loss, multiclass_focal_loss, soft_dice


def test_focal_and_dice_against_hand_computed_values() -> None:
    probs = torch.tensor([[0.8, 0.3], [0.2, 0.7]]).view(1, 2, 1, 2)  # pixel 0: p_normal .8, pixel 1: p_abn .7
    target = torch.tensor([[0, 1]]).view(1, 1, 2)
    pt = torch.tensor([0.8, 0.7])  # one-hot clamping at 1e-5 changes pt by < 1e-5
    expected = (-((1 - pt) ** 2) * pt.log()).mean()
    assert torch.isclose(multiclass_focal_loss(probs, target), expected, atol=1e-4)
    p, t = torch.tensor([[0.5, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.isclose(dice_loss(p, t), torch.tensor(1 - (2 * 1.5 + 1) / (1.5 + 2 + 1)))


def test_soft_dice_sums_over_the_given_dims_only() -> None:
    p = torch.tensor([[[0.5, 1.0], [0.0, 0.25]], [[1.0, 1.0], [1.0, 1.0]]])  # (2, 2, 2)
    t = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    per_item = soft_dice(p, t, (1, 2))
    expected = torch.tensor([(2 * 1.5 + 1) / (1.75 + 2 + 1), (2 * 1.0 + 1) / (4.0 + 1 + 1)])
    torch.testing.assert_close(per_item, expected)
    per_row = soft_dice(p, t, -1, eps=0.0)  # (2, 2): one coefficient per row of each item
    torch.testing.assert_close(per_row[0], torch.tensor([2 * 1.5 / 3.5, 0.0]))


def test_binary_focal_loss_matches_the_formula() -> None:
    logits = torch.tensor([0.0, 2.0, -1.0, 3.0]).view(1, 1, 2, 2)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2)
    p = torch.sigmoid(logits.flatten())
    t = target.flatten()
    p_t = torch.where(t > 0, p, 1 - p)
    alpha_t = torch.where(t > 0, torch.tensor(0.25), torch.tensor(0.75))
    expected = (-alpha_t * (1 - p_t) ** 2 * p_t.log()).mean()
    out = binary_focal_loss(logits, target)
    assert out.shape == (1, 1)
    assert out.item() == pytest.approx(expected.item(), rel=1e-5)
