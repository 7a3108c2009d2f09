"""Object-in-clutter: balanced, seeded, exact masks; token masks by coverage."""

from __future__ import annotations

import numpy as np
import pytest

from potpourri import PotpourriError
from potpourri.data.clutter import CLUTTER_CLASSES, make_clutter, token_masks


def test_balanced_seeded_and_masks_cover_the_object_colour() -> None:
    images, labels, masks = make_clutter(40, size=32, seed=3)
    assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8 and masks.shape == (40, 32, 32)
    assert np.bincount(labels, minlength=len(CLUTTER_CLASSES)).tolist() == [4] * 10
    again = make_clutter(40, size=32, seed=3)
    assert np.array_equal(images, again[0]) and np.array_equal(masks, again[2])
    assert not np.array_equal(images, make_clutter(40, size=32, seed=4)[0])
    for image, mask in zip(images, masks, strict=True):
        assert 0.03 < mask.mean() < 0.5  # one object of the planted size range
        inside = image[mask].astype(float)
        # the object is one flat colour (plus noise and anti-aliased edges): its pixels vary far less than the image
        assert np.median(inside.std(0)) < 0.5 * np.median(image.reshape(-1, 3).astype(float).std(0))


def test_token_masks_by_coverage() -> None:
    masks = np.zeros((1, 8, 8), bool)
    masks[0, :4, :4] = True  # the whole first 4x4 patch
    masks[0, 4, 4] = True  # 1 of 16 pixels of the last patch
    assert token_masks(masks, 4).tolist() == [[True, False, False, False]]
    assert token_masks(masks, 4, min_fraction=1 / 16).tolist() == [[True, False, False, True]]
    with pytest.raises(PotpourriError, match="multiple of the patch size"):
        token_masks(masks, 3)
