"""Copy-paste defect synthesis: labels cover every changed pixel, classes and pixels survive, seeded, checked."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from potpourri.core.errors import PotpourriError
from potpourri.segment.copypaste import CopyPaste, CopyPasteConfig, DefectGenerator

SIZE = 40


def real_set() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two textured images with planted defects of classes 3 and 5 (and 2 in the second), one normal image."""
    rng = np.random.default_rng(0)
    images = rng.integers(60, 120, (2, SIZE, SIZE, 3)).astype(np.uint8)
    masks = np.zeros((2, SIZE, SIZE), np.int64)
    images[0, 5:11, 5:13] = (230, 30, 30)
    masks[0, 5:11, 5:13] = 3
    images[1, 20:24, 4:30] = (20, 200, 20)  # a long bar: turns must keep all of it
    masks[1, 20:24, 4:30] = 5
    images[1, 30:33, 30:33] = (0, 0, 250)
    masks[1, 30:33, 30:33] = 2
    normal = rng.integers(150, 200, (1, SIZE, SIZE, 3)).astype(np.uint8)
    return images, masks, normal


def test_implements_the_shared_generator_protocol() -> None:
    assert isinstance(CopyPaste(), DefectGenerator)


def test_every_changed_pixel_is_labelled_and_classes_are_preserved() -> None:
    images, masks, normal = real_set()
    out, out_masks = CopyPaste().fit(images, masks, normals=normal).sample(30, seed=0)
    assert out.shape == (30, SIZE, SIZE, 3) and out.dtype == np.uint8
    assert out_masks.shape == (30, SIZE, SIZE) and out_masks.dtype == np.int64
    changed = (out != normal[0]).any(axis=-1)  # the only target is the one normal image
    assert not (changed & (out_masks == 0)).any()  # nothing outside the pasted masks was touched
    assert set(np.unique(out_masks)) <= {0, 2, 3, 5}
    assert (out_masks > 0).reshape(30, -1).any(axis=1).all()  # every sample holds a defect
    assert {2, 3, 5} <= set(np.unique(out_masks))  # class-balanced choice reaches every class


def test_one_hard_paste_reproduces_a_source_region_exactly() -> None:
    images, masks, normal = real_set()
    cfg = CopyPasteConfig(defects_per_image=(1, 1), feather_px=0, match_tone=False, flip=False, rotate=False)
    gen = CopyPaste(cfg).fit(images, masks, normals=normal)
    out, out_masks = gen.sample(12, seed=3)
    sources = {
        3: (0, (slice(5, 11), slice(5, 13))),
        5: (1, (slice(20, 24), slice(4, 30))),
        2: (1, (slice(30, 33),) * 2),
    }
    for image, mask in zip(out, out_masks, strict=True):
        (cls,) = set(np.unique(mask)) - {0}
        index, box = sources[int(cls)]
        (found,) = ndimage.find_objects((mask > 0).astype(int))
        np.testing.assert_array_equal(image[found], images[index][box])  # the pixels, unchanged
        np.testing.assert_array_equal(mask[found], masks[index][box])


def test_turned_regions_keep_their_pixel_count() -> None:
    images, masks, normal = real_set()
    cfg = CopyPasteConfig(defects_per_image=(1, 1), feather_px=0, match_tone=False)
    _, out_masks = CopyPaste(cfg).fit(images, masks, normals=normal).sample(20, seed=1)
    sizes = {3: 48, 5: 104, 2: 9}
    for mask in out_masks:
        (cls,) = set(np.unique(mask)) - {0}
        assert (mask == cls).sum() == sizes[int(cls)]


def test_tone_matching_shifts_by_the_ring_difference() -> None:
    images = np.full((1, SIZE, SIZE, 3), 50, np.uint8)
    images[0, 10:16, 10:16] = 100
    masks = np.zeros((1, SIZE, SIZE), np.int64)
    masks[0, 10:16, 10:16] = 1
    normal = np.full((1, SIZE, SIZE, 3), 120, np.uint8)
    cfg = CopyPasteConfig(defects_per_image=(1, 1), feather_px=0, match_tone=True)
    out, out_masks = CopyPaste(cfg).fit(images, masks, normals=normal).sample(3, seed=0)
    assert (out[out_masks == 1] == 100 + (120 - 50)).all()  # the defect keeps its contrast to its surroundings
    assert (out[out_masks == 0] == 120).all()


def test_feathered_alpha_softens_wide_defects_and_keeps_thin_ones_opaque() -> None:
    images, masks, normal = real_set()
    cfg = CopyPasteConfig(defects_per_image=(1, 1), feather_px=2.0, match_tone=False, flip=False, rotate=False)
    out, out_masks = CopyPaste(cfg).fit(images[:1], masks[:1], normals=normal).sample(1, seed=0)
    region = out_masks[0] == 3
    edge = region & ~ndimage.binary_erosion(region)
    target = normal[0].astype(float)
    # rim pixels (depth 1 of a ramp of 2) are the half-way blend of defect and target; the core is the defect
    expected = np.rint(0.5 * target[edge] + 0.5 * np.array([230.0, 30.0, 30.0]))
    np.testing.assert_array_equal(out[0][edge], expected)
    assert (out[0][region & ~edge] == (230, 30, 30)).all()
    line = np.zeros((1, SIZE, SIZE), np.int64)
    line[0, 10, 5:30] = 1  # a 1-px scratch: its half-width is 1 px, so it stays fully opaque
    thin = images[:1].copy()
    thin[0, 10, 5:30] = 255
    out, out_masks = CopyPaste(cfg).fit(thin, line, normals=normal).sample(1, seed=0)
    assert (out[0][out_masks[0] == 1] == 255).all()


def test_seeded_determinism() -> None:
    images, masks, normal = real_set()
    gen = CopyPaste().fit(images, masks, normals=normal)
    a, b, c = gen.sample(5, seed=7), gen.sample(5, seed=7), gen.sample(5, seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_without_normals_pastes_onto_training_images_and_keeps_their_labels() -> None:
    images, masks, _ = real_set()
    out, out_masks = CopyPaste(CopyPasteConfig(defects_per_image=(1, 1))).fit(images, masks).sample(10, seed=0)
    for image, mask in zip(out, out_masks, strict=True):
        base = [i for i in range(2) if ((image == images[i]).all(-1) | (mask > 0)).all()]
        assert base, "each sample is one training image with pasted defects"
        kept = masks[base[0]] > 0
        assert ((mask[kept] == masks[base[0]][kept]) | (mask[kept] > 0)).all()
        assert (mask > 0).sum() >= kept.sum() - 104  # a paste may cover part of an old defect, never erase it


def test_bad_inputs_raise_one_line_errors() -> None:
    images, masks, normal = real_set()
    with pytest.raises(PotpourriError, match="masks must be integer class ids"):
        CopyPaste().fit(images, masks[:, :-1])
    with pytest.raises(PotpourriError, match="no defect pixels"):
        CopyPaste().fit(images, np.zeros_like(masks))
    with pytest.raises(PotpourriError, match="normals must be"):
        CopyPaste().fit(images, masks, normals=normal[:, :-2])
    with pytest.raises(PotpourriError, match=r"\(N, H, W, 3\) uint8"):
        CopyPaste().fit(images[..., :1], masks)
    with pytest.raises(PotpourriError, match="not fitted"):
        CopyPaste().sample(2, seed=0)
    with pytest.raises(PotpourriError, match="defects_per_image"):
        CopyPaste(CopyPasteConfig(defects_per_image=(2, 1)))
