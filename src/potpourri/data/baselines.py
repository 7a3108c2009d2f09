"""Pixel-statistics baselines: what a method must beat to show it sees more than colour."""

from __future__ import annotations

import numpy as np

__all__ = ["colour_histograms"]


def colour_histograms(images: np.ndarray, bins: int = 32) -> np.ndarray:
    """Per-channel histograms plus an 8x8x8 joint colour histogram, normalised; (N, 3 * bins + 512)."""
    feats = []
    for image in images:
        pixels = image.reshape(-1, 3).astype(np.int64)
        per_channel = [np.bincount(pixels[:, c] * bins // 256, minlength=bins) for c in range(3)]
        q = pixels // 32
        joint = np.bincount(q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2], minlength=512)
        feats.append(np.concatenate([*per_channel, joint]) / len(pixels))
    return np.asarray(feats, np.float32)
