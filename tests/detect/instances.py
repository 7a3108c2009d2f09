"""Tiny planted instance data shared by the detector tests: one known box and mask per random image."""

from __future__ import annotations

import numpy as np

from potpourri.detect.mask_head import InstanceSample


def planted_instances(n: int = 4, size: int = 64, classes: int = 2) -> list[InstanceSample]:
    """``n`` random ``size`` x ``size`` images, each with one box (shifted by the index) filled by its mask; class
    ``i % classes``."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        box = np.asarray([[4 + i, 8, 30 + i, 40]], np.float32)
        mask = np.zeros((1, size, size), bool)
        mask[0, 8:40, 4 + i : 30 + i] = True
        out.append(InstanceSample(image, mask, box, np.asarray([i % classes])))
    return out
