"""Detection boxes: from masks (hand-made and DS-Synth), YOLO and COCO loaders with their errors on bad labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from potpourri.core.errors import PotpourriError
from potpourri.data.boxes import (
    boxes_from_mask,
    read_coco,
    read_detection_data,
    read_yolo,
    resize_sample,
    synth_detection_samples,
)
from potpourri.data.synth import DEFECTS


def _sorted_rows(boxes: np.ndarray, labels: np.ndarray) -> list[tuple]:
    return sorted((int(c), *map(float, b)) for b, c in zip(boxes, labels, strict=True))


def test_boxes_from_mask_one_box_per_region_and_class() -> None:
    mask = np.zeros((40, 40), np.uint8)
    mask[2:6, 3:8] = 1  # rows 2..5, columns 3..7 -> box (3, 2, 8, 6)
    mask[2:6, 12:16] = 1  # same class, 4 px to the right of the first
    mask[20:30, 20:25] = 3
    mask[35, 35] = 2  # a single pixel: below min_pixels
    boxes, labels = boxes_from_mask(mask, merge_gap=0)
    expected = [(0, 3.0, 2.0, 8.0, 6.0), (0, 12.0, 2.0, 16.0, 6.0), (2, 20.0, 20.0, 25.0, 30.0)]
    assert _sorted_rows(boxes, labels) == expected
    # a gap of 0.15 × 40 = 6 px joins the two class-1 squares (4 px apart); class 3 stays its own box
    boxes, labels = boxes_from_mask(mask, merge_gap=0.15)
    assert _sorted_rows(boxes, labels) == [(0, 3.0, 2.0, 16.0, 6.0), (2, 20.0, 20.0, 25.0, 30.0)]
    assert (1, 35.0, 35.0, 36.0, 36.0) in _sorted_rows(*boxes_from_mask(mask, merge_gap=0, min_pixels=1))
    empty_boxes, empty_labels = boxes_from_mask(np.zeros((8, 8), np.uint8))
    assert empty_boxes.shape == (0, 4) and empty_labels.shape == (0,)


def test_regions_of_different_classes_never_merge() -> None:
    mask = np.zeros((20, 20), np.uint8)
    mask[5:10, 5:10], mask[5:10, 10:15] = 1, 2  # touching, but different classes
    assert _sorted_rows(*boxes_from_mask(mask, merge_gap=0.5)) == [(0, 5, 5, 10, 10), (1, 10, 5, 15, 10)]


def test_synth_boxes_cover_every_kept_defect_pixel_with_the_right_class() -> None:
    samples = synth_detection_samples("brick", "train", 7, size=64)
    for sample, kind in zip(samples, (*DEFECTS, "multi"), strict=True):
        assert len(sample.labels) >= 1
        if kind != "multi":
            assert set(sample.labels.tolist()) == {DEFECTS.index(kind)}
        assert (sample.boxes[:, 2] > sample.boxes[:, 0]).all() and (sample.boxes[:, 3] > sample.boxes[:, 1]).all()
        assert sample.boxes.min() >= 0 and sample.boxes.max() <= 64
    # an independent check on one sample: its class-1 pixels all lie inside its class-0 boxes
    from potpourri.data.synth import make_samples

    raw = make_samples("brick", "train", 1, size=64, kinds=("scratch",))[0]
    sample = synth_detection_samples("brick", "train", 1, size=64, kinds=("scratch",))[0]
    ys, xs = np.nonzero(raw.mask == 1)
    inside = np.zeros(len(ys), bool)
    for x1, y1, x2, y2 in sample.boxes:
        inside |= (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
    assert inside.mean() > 0.95  # only specks under min_pixels may fall outside


def _write_yolo(root: Path, write_png, labels: dict[str, str], names: str | None = "a\nb\n") -> Path:
    for stem, text in labels.items():
        write_png(root / "images" / f"{stem}.png", np.zeros((20, 40, 3), np.uint8))  # 40 wide, 20 high
        (root / "labels").mkdir(parents=True, exist_ok=True)
        (root / "labels" / f"{stem}.txt").write_text(text)
    if names is not None:
        (root / "classes.txt").write_text(names)
    return root


def test_yolo_reads_pixel_boxes_and_empty_files(tmp_path: Path, write_png) -> None:
    root = _write_yolo(tmp_path, write_png, {"one": "1 0.5 0.5 0.5 0.5\n0 0.125 0.25 0.25 0.5\n", "none": ""})
    samples, names, _ = read_yolo(root)
    assert names == ("a", "b")
    by_name = {s.name: s for s in samples}
    assert by_name["none.png"].boxes.shape == (0, 4)  # an empty label file: no objects
    # centre (20, 10), size (20, 10) -> (10, 5, 30, 15); centre (5, 5), size (10, 10) -> (0, 0, 10, 10)
    np.testing.assert_allclose(by_name["one.png"].boxes, [[10, 5, 30, 15], [0, 0, 10, 10]])
    assert by_name["one.png"].labels.tolist() == [1, 0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2 0.5 0.5 0.2 0.2", "unknown class id 2"),
        ("-1 0.5 0.5 0.2 0.2", "unknown class id -1"),
        ("0.5 0.5 0.5 0.2 0.2", "unknown class id"),
        ("0 0.95 0.5 0.2 0.2", "outside the image"),
        ("0 0.5 0.5 0 0.2", "must be positive"),
        ("0 0.5 0.5 0.2", "5 numbers"),
        ("0 x 0.5 0.2 0.2", "not five numbers"),
    ],
)
def test_yolo_bad_labels_name_file_line_and_fix(tmp_path: Path, write_png, text: str, message: str) -> None:
    root = _write_yolo(tmp_path, write_png, {"img": "0 0.5 0.5 0.1 0.1\n" + text + "\n"})
    with pytest.raises(PotpourriError, match=message) as info:
        read_yolo(root)
    assert "img.txt:2" in str(info.value) and "\n" not in str(info.value)


def test_yolo_missing_label_file_and_yaml_names(tmp_path: Path, write_png) -> None:
    root = _write_yolo(tmp_path, write_png, {"img": "1 0.5 0.5 0.1 0.1"}, names=None)
    (root / "data.yaml").write_text("names: {0: scratch, 1: dent}\n")
    _, names, _ = read_yolo(root)
    assert names == ("scratch", "dent")
    write_png(root / "images" / "orphan.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(PotpourriError, match="create an empty one"):
        read_yolo(root)


def _coco(tmp_path: Path, write_png, annotations: list[dict]) -> Path:
    write_png(tmp_path / "images" / "a.png", np.zeros((30, 50, 3), np.uint8))
    write_png(tmp_path / "images" / "b.png", np.zeros((30, 50, 3), np.uint8))
    data = {
        "images": [{"id": 7, "file_name": "a.png", "width": 50, "height": 30},
                   {"id": 9, "file_name": "b.png", "width": 50, "height": 30}],
        "categories": [{"id": 5, "name": "hole"}, {"id": 2, "name": "crack"}],
        "annotations": annotations,
    }  # fmt: skip
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_maps_category_ids_in_order_and_skips_crowd(tmp_path: Path, write_png) -> None:
    path = _coco(
        tmp_path,
        write_png,
        [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 5, 20, 10]},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1},
        ],
    )
    samples, names, notes = read_coco(path)
    assert names == ("crack", "hole")  # ids 2, 5 -> indices 0, 1
    a, b = samples
    np.testing.assert_allclose(a.boxes, [[10, 5, 30, 15]])
    assert a.labels.tolist() == [1] and len(b.labels) == 0
    assert notes == ["1 iscrowd annotations left out"]


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        ({"id": 3, "image_id": 7, "category_id": 4, "bbox": [1, 1, 2, 2]}, "unknown category_id 4"),
        ({"id": 3, "image_id": 8, "category_id": 5, "bbox": [1, 1, 2, 2]}, "unknown image_id 8"),
        ({"id": 3, "image_id": 7, "category_id": 5, "bbox": [40, 1, 20, 2]}, "outside image 'a.png'"),
        ({"id": 3, "image_id": 7, "category_id": 5, "bbox": [1, 1, 0, 2]}, "empty box"),
    ],
)
def test_coco_bad_annotations(tmp_path: Path, write_png, annotation: dict, message: str) -> None:
    with pytest.raises(PotpourriError, match=message):
        read_coco(_coco(tmp_path, write_png, [annotation]))


def test_read_detection_data_specs(tmp_path: Path, write_png) -> None:
    data = read_detection_data("ds-synth:gravel", image_size=64, per_kind=1)
    assert data.class_names == DEFECTS and data.layout == "ds-synth"
    assert len(data.train) == 7 + 1 and len(data.test) == 2 * 7  # one per kind + a good one; two per kind
    assert all(s.image.shape == (64, 64, 3) for s in data.train + data.test)
    with pytest.raises(PotpourriError, match="unknown DS-Synth category 'bricks'"):
        read_detection_data("ds-synth:bricks", image_size=64)
    root = _write_yolo(tmp_path / "y", write_png, {f"i{k}": "0 0.5 0.5 0.5 0.5" for k in range(5)})
    data = read_detection_data(str(root), image_size=32, test_fraction=0.4)
    assert (len(data.train), len(data.test)) == (3, 2) and data.layout == "yolo"
    np.testing.assert_allclose(data.train[0].boxes, [[8, 8, 24, 24]])  # 40x20 resized to 32x32
    with pytest.raises(PotpourriError, match="neither a YOLO folder nor a COCO json"):
        read_detection_data(str(tmp_path / "y" / "images"), image_size=32)


def test_resize_scales_boxes() -> None:
    from potpourri.data.boxes import DetectionSample

    sample = DetectionSample(np.zeros((10, 20, 3), np.uint8), [[2, 1, 10, 5]], [0])
    np.testing.assert_allclose(resize_sample(sample, 40).boxes, [[4, 4, 20, 20]])
