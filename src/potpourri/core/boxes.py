"""Box geometry shared by every folder: one intersection-over-union for xyxy boxes, elementwise (torch, with
gradients, for assigners and losses) or pairwise (numpy, for evaluation and text answers).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["box_iou", "box_iou_elementwise", "intersection_union"]


def intersection_union(a: torch.Tensor, b: torch.Tensor, *, plus_one: bool = False) -> tuple[torch.Tensor, ...]:
    """Intersection and union areas of xyxy boxes that broadcast: ``(..., 4), (..., 4) -> (...), (...)``.

    ``plus_one`` counts both end pixels (MiniGPT-v2's evaluation); degenerate boxes have zero area.
    """
    extra = 1.0 if plus_one else 0.0
    width = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0]) + extra).clamp_min(0)
    height = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1]) + extra).clamp_min(0)
    inter = width * height
    area_a = (a[..., 2] - a[..., 0] + extra).clamp_min(0) * (a[..., 3] - a[..., 1] + extra).clamp_min(0)
    area_b = (b[..., 2] - b[..., 0] + extra).clamp_min(0) * (b[..., 3] - b[..., 1] + extra).clamp_min(0)
    return inter, area_a + area_b - inter


def box_iou_elementwise(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """IoU of xyxy boxes ``a`` and ``b`` that broadcast against each other: ``(..., 4), (..., 4) -> (...)``."""
    inter, union = intersection_union(a, b)
    return inter / (union + eps)


def box_iou(boxes_a: np.ndarray | Sequence, boxes_b: np.ndarray | Sequence, *, plus_one: bool = False) -> np.ndarray:
    """Pairwise IoU ``(N, M)`` of xyxy boxes (torchvision's convention; ``plus_one``: MiniGPT-v2's eval, +1 px).

    Empty pairs (zero union) give 0, not NaN.
    """
    a = torch.as_tensor(np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4))
    b = torch.as_tensor(np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4))
    inter, union = intersection_union(a[:, None], b[None], plus_one=plus_one)  # (N, M)
    iou = inter / torch.where(union > 0, union, torch.ones_like(union))
    return torch.where(union > 0, iou, torch.zeros_like(iou)).numpy()
