"""Pieces shared by several models and methods (anomalib's ``components``): soft Dice, focal losses and a separable
Gaussian blur. Box geometry is in ``core/boxes.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["binary_focal_loss", "dice_loss", "gaussian_blur", "multiclass_focal_loss", "soft_dice", "varifocal_loss"]


def soft_dice(probs: torch.Tensor, target: torch.Tensor, dims: int | tuple[int, ...], eps: float = 1.0) -> torch.Tensor:
    """Soft Dice coefficient ``(2·Σpt + eps) / (Σp + Σt + eps)``, summed over ``dims``; the other dims remain."""
    return (2 * (probs * target).sum(dims) + eps) / (probs.sum(dims) + target.sum(dims) + eps)


def dice_loss(probs: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice of (N, ...) probabilities against 0/1 targets, one coefficient per item."""
    return 1 - soft_dice(probs.flatten(1), target.flatten(1).to(probs.dtype), 1, eps).mean()


def binary_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.) per mask, averaged over the pixels: (B, M, H, W) -> (B, M)."""
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * ce * (1 - p_t) ** gamma).flatten(2).mean(-1)


def multiclass_focal_loss(
    probs: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """Focal loss on class probabilities (B, C, H, W) against integer targets (B, H, W), as AnomalyCLIP's loss.py."""
    classes = probs.shape[1]
    one_hot = F.one_hot(target.long(), classes).permute(0, 3, 1, 2).to(probs.dtype)  # (B, C, H, W)
    one_hot = one_hot.clamp(smooth / (classes - 1), 1.0 - smooth)
    pt = (one_hot * probs).sum(1) + smooth  # (B, H, W)
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding (radius 4σ, capped by the map size)."""
    if sigma <= 0:
        return maps
    height, width = maps.shape[-2:]
    radius = min(int(4 * sigma + 0.5), height - 1, width - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = maps.unsqueeze(1)  # (B, 1, H, W)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)  # (B, H, W)


def varifocal_loss(
    logits: torch.Tensor,
    target_scores: torch.Tensor,
    positive: torch.Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Varifocal loss (VarifocalNet; YOLOv6 ``VarifocalLoss``), summed: negatives weighted ``alpha · p^gamma``,
    positives by their target score."""
    weight = alpha * logits.sigmoid().pow(gamma) * (1 - positive) + target_scores * positive
    return (F.binary_cross_entropy_with_logits(logits, target_scores, reduction="none") * weight).sum()
