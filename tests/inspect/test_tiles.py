"""Tiled PatchCore for high-resolution parts: tiles cover the image flush to its edges, fit and predict use the same
native-resolution tiles, and a small defect on a 192 px part is found and located in the stitched full-size map."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from potpourri.core.errors import PotpourriError
from potpourri.core.metrics import image_auroc
from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig, tile_grid
from tests.planted import texture_crops

pytestmark = pytest.mark.one_thread


def test_tiles_cover_the_image_and_end_flush_with_its_edges():
    image = Image.fromarray(np.zeros((200, 250, 3), np.uint8))
    tiles, corners = tile_grid(image, 96, 0.25)  # stride 72
    assert sorted({left for _, left in corners}) == [0, 72, 144, 154]
    assert sorted({top for top, _ in corners}) == [0, 72, 104]
    covered = np.zeros((200, 250), int)
    for top, left in corners:
        covered[top : top + 96, left : left + 96] += 1
    assert covered.min() >= 1 and all(t.shape == (96, 96, 3) for t in tiles)
    small, where = tile_grid(Image.fromarray(np.zeros((50, 300, 3), np.uint8)), 96, 0.25)
    assert len(small) == 1 and where == [(0, 0)] and small[0].shape == (50, 300, 3)
    with pytest.raises(PotpourriError, match="tile_overlap"):
        tile_grid(image, 96, 1.0)


def test_a_small_defect_on_a_large_part_is_found_and_located_at_full_resolution(lite0):
    train = texture_crops("brick", (0, 250), 3, seed=0, size=192)  # rows 0-249 for fitting, 256-511 for testing
    good = texture_crops("brick", (256, 512), 3, seed=1, size=192)
    bad, where = [], []
    for i, image in enumerate(texture_crops("brick", (256, 512), 3, seed=2, size=192)):
        top, left = 30 + 50 * i, 140 - 45 * i
        image = image.copy()
        image[top : top + 8, left : left + 8] = (250, 250, 40)  # 8 px: under 3 px once shrunk to 64
        bad.append(image)
        where.append((top + 4, left + 4))
    config = PatchCoreConfig(image_size=64, coreset_ratio=0.25, tile=True, tile_overlap=0.25)
    method = PatchCore(config, backbone=lite0).fit(train)
    assert method.n_train_images == 3 and method.memory_bank.shape[0] > 0
    results = method.predict(good + bad)
    assert all(r.anomaly_map.shape == (192, 192) for r in results)
    scores = np.array([r.score for r in results])
    assert image_auroc(np.array([0, 0, 0, 1, 1, 1]), scores) == 1.0
    for result, (y, x) in zip(results[3:], where, strict=True):
        peak = np.unravel_index(result.anomaly_map.argmax(), result.anomaly_map.shape)
        assert abs(peak[0] - y) <= 12 and abs(peak[1] - x) <= 12, (peak, (y, x))
    scores_s, maps_s = method.score(good[:1])  # score() keeps its (N, S, S) contract
    assert maps_s.shape == (1, 64, 64) and scores_s[0] == pytest.approx(scores[0])
