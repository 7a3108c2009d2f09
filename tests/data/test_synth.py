"""DS-Synth: exact masks, untouched pixels outside them, disjoint splits, determinism and the task views."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from potpourri.core.errors import PotpourriError
from potpourri.data.synth import (
    CATEGORIES,
    CLASSES,
    MULTI,
    make_sample,
    make_samples,
    make_task,
    photo,
    split_rows,
    write_ds_synth,
)

KINDS = (*CLASSES, MULTI)


@pytest.mark.parametrize("category", list(CATEGORIES))
@pytest.mark.parametrize("kind", KINDS)
def test_pixels_outside_mask_are_the_clean_crop(category: str, kind: str) -> None:
    for index in range(2):
        s = make_sample(category, "test", kind, index, size=64)
        outside = s.mask == 0
        np.testing.assert_array_equal(s.image[outside], s.clean[outside])
        if kind != "good":  # and the defect is really drawn: most mask pixels changed
            inside = ~outside
            changed = (s.image[inside] != s.clean[inside]).any(axis=1).mean()
            assert changed > 0.9, (kind, changed)


@pytest.mark.parametrize("kind", CLASSES)
def test_single_kind_mask_holds_exactly_its_class(kind: str) -> None:
    for category in ("brick", "tissue"):
        s = make_sample(category, "test", kind, 0, size=64)
        expected = set() if kind == "good" else {CLASSES.index(kind)}
        assert set(np.unique(s.mask).tolist()) - {0} == expected
        assert s.label == CLASSES.index(kind)
        assert (kind in s.caption) if kind != "good" else ("no defect" in s.caption)


def test_multi_defect_images_hold_several_classes_and_caption_each() -> None:
    for index in range(6):
        s = make_sample("grass", "test", MULTI, index, size=96)
        present = {CLASSES[k] for k in np.unique(s.mask) if k}
        assert len(present) >= 2
        assert present == set(s.defect_classes)
        for name in present:
            assert name in s.caption


def test_caption_location_matches_where_the_defect_is() -> None:
    for index in range(8):
        s = make_sample("gravel", "test", "stain", index, size=96)
        ys, xs = np.nonzero(s.mask)
        row, col = int(ys.mean() / 96 * 3), int(xs.mean() / 96 * 3)  # 3x3 grid cell of the mask's centroid
        vertical = ("upper", "top")[col == 1] if row == 0 else ("lower", "bottom")[col == 1] if row == 2 else ""
        horizontal = ("left", "", "right")[col] if row != 1 or col != 1 else "center"
        for word in (vertical, horizontal):
            assert word in s.caption, (s.caption, row, col)


def _reconstruct(s) -> np.ndarray:
    """The sample's crop rebuilt from the photo and its recorded box/transform (no colour jitter), float grey."""
    y0, x0, y1, x1 = s.crop_box
    crop = np.rot90(photo(s.category)[y0:y1, x0:x1], s.transform[0])
    if s.transform[1]:
        crop = crop[:, ::-1]
    size = s.image.shape[0]
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, np.float64).mean(axis=2)


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_train_and_test_crops_come_from_disjoint_rows(category: str) -> None:
    train_rows, test_rows = split_rows(category, "train"), split_rows(category, "test")
    assert train_rows[1] <= test_rows[0]
    for split, (lo, hi) in (("train", train_rows), ("test", test_rows)):
        for s in make_samples(category, split, 14, size=48):
            y0, _, y1, _ = s.crop_box
            assert lo <= y0 < y1 <= hi, (split, s.crop_box)
    # the recorded box is where the pixels really came from: the clean crop matches the rebuilt one
    s = make_sample(category, "test", "good", 3, size=48)
    corr = np.corrcoef(_reconstruct(s).ravel(), s.clean.astype(np.float64).mean(axis=2).ravel())[0, 1]
    assert corr > 0.97


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    a = make_sample("moon", "test", MULTI, 1, seed=7, size=64)
    b = make_sample("moon", "test", MULTI, 1, seed=7, size=64)
    c = make_sample("moon", "test", MULTI, 1, seed=8, size=64)
    assert a.image.tobytes() == b.image.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    assert a.caption == b.caption
    assert a.image.tobytes() != c.image.tobytes()


@pytest.mark.parametrize("kind", CLASSES[1:])
def test_severity_grows_defect_area(kind: str) -> None:
    def area(severity: float) -> float:
        masks = [make_sample("brick", "test", kind, i, size=64, severity=severity).mask for i in range(6)]
        return float(np.mean([(m > 0).sum() for m in masks]))

    assert area(0.9) > area(0.1)


def test_written_files_match_manifest_hashes_and_are_reproducible(tiny_synth, tiny_config, tmp_path) -> None:
    root, manifest = tiny_synth
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    again = write_ds_synth(tmp_path, **tiny_config)
    assert again["files"] == manifest["files"]
    assert (tmp_path / "manifest.json").read_bytes() == (root / "manifest.json").read_bytes()


def test_written_layouts_hold_the_in_memory_samples(tiny_synth) -> None:
    root, manifest = tiny_synth
    s = make_sample("gravel", "test", "hole", 1, size=48)
    image = np.asarray(Image.open(root / "DS-Synth/gravel/image/hole/001.png"))
    mask = np.asarray(Image.open(root / "DS-Synth/gravel/mask/hole/001_mask.png"))
    binary = np.asarray(Image.open(root / "MVTec-Synth/gravel/ground_truth/hole/001_mask.png"))
    np.testing.assert_array_equal(image, s.image)
    np.testing.assert_array_equal(mask, s.mask)
    np.testing.assert_array_equal(binary, (s.mask > 0) * 255)
    counts = manifest["counts"]["brick"]
    assert counts["train/good"] == 4 and all(counts[f"test/{k}"] == 2 for k in KINDS)
    captions = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == sum(sum(c.values()) for c in manifest["counts"].values())


def test_tasks_have_the_documented_labels() -> None:
    cls = make_task("classification", categories=("brick",), n_per_class=2, size=32)
    assert cls.train_images.shape == (14, 32, 32, 3) and cls.train_images.dtype == np.uint8
    assert np.bincount(cls.train_labels).tolist() == [2] * 7 and np.bincount(cls.test_labels).tolist() == [2] * 7
    ad = make_task("anomaly", categories=("brick",), n_per_class=1, size=32)
    assert ad.train_labels.sum() == 0 and ad.train_masks.max() == 0
    assert ad.test_labels.tolist() == [0, 1, 1, 1, 1, 1, 1, 1] and set(np.unique(ad.test_masks)) == {0, 1}
    seg = make_task("segmentation", categories=("brick",), n_per_class=1, size=32)
    assert set(np.unique(seg.train_masks)) == set(range(7))


def test_bad_arguments_are_one_line_errors() -> None:
    with pytest.raises(PotpourriError, match=r"unknown DS-Synth category 'bottle'.*brick"):
        make_sample("bottle", "test", "good", 0)
    with pytest.raises(PotpourriError, match="unknown DS-Synth kind 'rust'"):
        make_sample("brick", "test", "rust", 0)
    with pytest.raises(PotpourriError, match=r"severity 1\.5"):
        make_sample("brick", "test", "hole", 0, severity=1.5)
    with pytest.raises(PotpourriError, match="unknown DS-Synth task"):
        make_task("detection")


def test_parallel_writing_gives_the_same_bytes(tiny_synth, tiny_config, tmp_path) -> None:
    _, manifest = tiny_synth
    assert write_ds_synth(tmp_path, **{**tiny_config, "workers": 2})["files"] == manifest["files"]
