"""Typed results shared by the task folders."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def mean_std(values: Sequence[float], sep: str = "±", digits: int = 3) -> str:
    """``mean±std`` over seeds (sample std, n-1); the mean alone for one value, ``—`` for none."""
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}{sep}{statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


@dataclass(frozen=True)
class InspectionResult:
    """One image's verdict: image score, (H, W) anomaly map, predicted defect mask and label (None: no threshold)."""

    score: float
    anomaly_map: np.ndarray  # (H, W) float32, at the method's input resolution
    mask: np.ndarray | None  # (H, W) bool, anomaly_map >= pixel threshold
    label: bool | None  # True = defect, score >= image threshold
    normalised: float | None = None  # 0-1, 0.5 at the image threshold (anomalib's min-max convention)
