"""Plots for reports (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["confusion_matrix_png", "image_grid_png"]


def confusion_matrix_png(matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Draw a confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = matrix.max() if matrix.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(matrix[i, j]), ha="center", va="center", color="white" if matrix[i, j] > top / 2 else "k")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def image_grid_png(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    path: str | os.PathLike,
    *,
    columns: int = 6,
    colors: Sequence[str] | None = None,
) -> Path:
    """Lay out HxWx3 uint8 images in a grid with a caption under each (optionally coloured, e.g. right/wrong)."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.3 * rows), dpi=100, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < len(images):
            ax.imshow(images[index])
            ax.set_title(captions[index], fontsize=8, color=colors[index] if colors else "k")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
