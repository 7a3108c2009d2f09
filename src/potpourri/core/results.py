"""Typed results shared by the task folders."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InspectionResult:
    """One image's verdict: image score, (H, W) anomaly map, predicted defect mask and label (None: no threshold)."""

    score: float
    anomaly_map: np.ndarray  # (H, W) float32, at the method's input resolution
    mask: np.ndarray | None  # (H, W) bool, anomaly_map >= pixel threshold
    label: bool | None  # True = defect, score >= image threshold
    normalised: float | None = None  # 0-1, 0.5 at the image threshold (anomalib's min-max convention)
