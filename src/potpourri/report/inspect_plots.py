"""Plots for inspection reports: heatmap overlays, image | truth | map | mask panels, ROC curves."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["heatmap_overlay", "inspection_panel_png", "roc_curves_png"]


def heatmap_overlay(
    image: np.ndarray, anomaly_map: np.ndarray, *, vmin: float, vmax: float, alpha: float = 0.5
) -> np.ndarray:
    """Blend a 'jet' colouring of ``anomaly_map`` (clipped to [vmin, vmax]) over an HxWx3 uint8 image."""
    if anomaly_map.shape != image.shape[:2]:
        raise ValueError(f"anomaly map {anomaly_map.shape} and image {image.shape[:2]} differ in size")
    scaled = np.clip((anomaly_map - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    colours = plt.get_cmap("jet")(scaled)[..., :3] * 255
    return (alpha * colours + (1 - alpha) * image.astype(np.float64)).round().astype(np.uint8)


def inspection_panel_png(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    path: str | os.PathLike,
    *,
    mask: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    vmin: float,
    vmax: float,
    title: str = "",
) -> Path:
    """One row: image | ground truth (if any) | heatmap overlay | predicted mask (if any)."""
    tiles = [("image", image, None)]
    if truth is not None:
        tiles.append(("ground truth", truth, "gray"))
    tiles.append(("anomaly map", heatmap_overlay(image, anomaly_map, vmin=vmin, vmax=vmax), None))
    if mask is not None:
        tiles.append(("predicted mask", mask, "gray"))
    fig, axes = plt.subplots(1, len(tiles), figsize=(2.4 * len(tiles), 2.7), dpi=100, squeeze=False)
    for ax, (caption, tile, cmap) in zip(axes[0], tiles, strict=True):
        ax.imshow(tile, cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
        ax.set_title(caption, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def roc_curves_png(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: str | os.PathLike) -> Path:
    """ROC curves ``name -> (fpr, tpr, auroc)`` on one plot, with the chance diagonal."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=100)
    for name, (fpr, tpr, auroc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
