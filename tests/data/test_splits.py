"""Seeded splits and pairings (data/splits.py)."""

from __future__ import annotations

import numpy as np
import pytest

from potpourri.data.splits import derangement, stratified_split


@pytest.mark.parametrize("n", [2, 3, 7, 60])
def test_derangement_is_a_permutation_without_fixed_points(n: int) -> None:
    for seed in range(20):
        order = derangement(n, seed)
        assert sorted(order.tolist()) == list(range(n))
        assert not np.any(order == np.arange(n))
    assert np.array_equal(derangement(n, 3), derangement(n, 3))  # seeded


def test_derangement_refuses_a_single_item() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0)


def test_stratified_split_keeps_every_class_on_both_sides() -> None:
    labels = np.repeat(np.arange(3), 10)
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(30))
    assert all(np.sum(labels[val] == c) == 2 for c in range(3))
