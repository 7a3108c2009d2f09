"""Seeded splits of labelled data."""

from __future__ import annotations

import numpy as np


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) indices."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        cut = max(1, round(fraction * len(members)))
        val.extend(members[:cut])
        train.extend(members[cut:])
    return np.sort(train), np.sort(val)
