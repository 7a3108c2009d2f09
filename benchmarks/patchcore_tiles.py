"""Tiled vs shrunk PatchCore on a small defect of a larger part: 8 px squares on 192 px brick crops, model input
64 px (shrinking makes the defect under 3 px). Same data as ``tests/inspect/test_tiles.py``.

Run: ``.venv/bin/python benchmarks/patchcore_tiles.py``. Prints image AUROC (3 good, 3 defect) and the scores.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.planted: the same texture crops as the test


def main() -> None:
    from potpourri import create_model
    from potpourri.core.metrics import image_auroc
    from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig
    from tests.planted import texture_crops

    torch.set_num_threads(1)
    lite0 = create_model("efficientnet_lite0", pretrained=True).eval()
    train = texture_crops("brick", (0, 250), 3, seed=0, size=192)
    good = texture_crops("brick", (256, 512), 3, seed=1, size=192)
    bad = []
    for i, image in enumerate(texture_crops("brick", (256, 512), 3, seed=2, size=192)):
        top, left = 30 + 50 * i, 140 - 45 * i
        image = image.copy()
        image[top : top + 8, left : left + 8] = (250, 250, 40)
        bad.append(image)
    labels = np.array([0, 0, 0, 1, 1, 1])
    for tile in (False, True):
        method = PatchCore(PatchCoreConfig(image_size=64, coreset_ratio=0.25, tile=tile), backbone=lite0).fit(train)
        scores, _ = method.score(good + bad)
        shown = [round(float(s), 2) for s in scores]
        print(f"tile={tile!s:<5} image AUROC {image_auroc(labels, scores):.3f}  scores {shown}")


if __name__ == "__main__":
    main()
