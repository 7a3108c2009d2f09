"""Boxes for detection: derived from DS-Synth masks, or read from YOLO-format and COCO-json folders.

Every source yields ``DetectionSample``s: an (H, W, 3) uint8 image, ``boxes`` (N, 4) float32 as (x1, y1, x2, y2) in
pixels (continuous coordinates: a box around pixel columns 3..5 spans x 3.0 to 6.0) and ``labels`` (N,) int64, 0-based
indices into the dataset's class names. An image without objects has N = 0.

* **DS-Synth** (``boxes_from_mask``): one box per connected region of each defect class; regions of one class that
  lie within ``merge_gap`` × image side of each other count as one object (a cluster of contamination specks is one
  contamination), and regions under ``min_pixels`` (12) pixels are dropped. Class index = DS-Synth class id − 1.
* **YOLO** (``read_yolo``): ``images/*.png|jpg`` and ``labels/<stem>.txt`` with lines ``class cx cy w h``
  (normalised to [0, 1]); class names from ``classes.txt`` (one per line) or ``data.yaml``/``dataset.yaml``
  ``names``. An empty label file means "no objects"; a missing one is an error (create an empty file instead).
* **COCO** (``read_coco``): ``instances.json`` with ``images``, ``annotations`` (``bbox`` = [x, y, w, h] pixels) and
  ``categories``; category ids map to 0-based indices in id order; ``iscrowd`` annotations are left out.

Bad labels raise a one-line ``PotpourriError`` naming the file, the line and the fix: boxes outside the image
(beyond a rounding slack of 0.1 % or 1 px), empty or negative boxes, unknown class ids, malformed lines.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from potpourri.core.errors import PotpourriError

__all__ = [
    "DetectionData",
    "DetectionSample",
    "boxes_from_mask",
    "read_coco",
    "read_detection_data",
    "read_yolo",
    "resize_sample",
    "synth_detection_samples",
]

_NORM_SLACK = 1e-3  # normalised YOLO coordinates may overshoot [0, 1] by this much (rounding), then are clipped
_PIXEL_SLACK = 1.0  # COCO pixel boxes may overshoot the image by one pixel (rounding), then are clipped
_LAYOUT_HELP = (
    "expected ds-synth:<category>, a YOLO folder (images/ + labels/*.txt, classes.txt or data.yaml), or a COCO "
    "json file (images next to it or in images/)"
)


@dataclass
class DetectionSample:
    """One image and its boxes: (N, 4) float32 xyxy pixels and (N,) int64 0-based class indices."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    name: str = ""

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, np.int64).reshape(-1)


@dataclass
class DetectionData:
    """Train and test samples with class names and notes on what was done to them."""

    train: list[DetectionSample]
    test: list[DetectionSample]
    class_names: tuple[str, ...]
    layout: str
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- DS-Synth
def boxes_from_mask(
    mask: np.ndarray, *, merge_gap: float = 0.03, min_pixels: int = 12, class_offset: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (N, 4) xyxy and labels (N,) of a class-index mask: one per (merged) connected region of each class.

    ``merge_gap`` is a fraction of the image's longer side (0: plain 8-connected components); label = value − offset.
    """
    if mask.ndim != 2:
        raise PotpourriError(f"mask must be (H, W) class indices, got shape {mask.shape}")
    grow = math.ceil(merge_gap * max(mask.shape) / 2)  # dilating both regions by gap/2 joins those within gap
    eight = np.ones((3, 3), bool)
    boxes, labels = [], []
    for value in np.unique(mask):
        if value < class_offset:
            continue  # background
        region = mask == value
        joined = ndimage.binary_dilation(region, eight, iterations=grow) if grow else region
        components, count = ndimage.label(joined, structure=eight)
        components = np.where(region, components, 0)  # the box encloses the defect's own pixels only
        for index, found in enumerate(ndimage.find_objects(components, max_label=count), start=1):
            if found is None or (components[found] == index).sum() < min_pixels:
                continue
            ys, xs = found
            boxes.append((xs.start, ys.start, xs.stop, ys.stop))
            labels.append(int(value) - class_offset)
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def synth_detection_samples(
    category: str,
    split: str,
    n: int,
    *,
    seed: int = 0,
    size: int = 256,
    kinds: Sequence[str] | None = None,
    merge_gap: float = 0.03,
) -> list[DetectionSample]:
    """``n`` DS-Synth samples (kinds cycle: the six defects and "multi" by default) with boxes from their masks."""
    from potpourri.data.synth import DEFECTS, MULTI, make_samples

    kinds = tuple(kinds) if kinds is not None else (*DEFECTS, MULTI)
    samples = []
    for s in make_samples(category, split, n, seed=seed, size=size, kinds=kinds):
        boxes, labels = boxes_from_mask(s.mask, merge_gap=merge_gap)
        samples.append(DetectionSample(s.image, boxes, labels, f"{s.category}/{s.split}/{s.kind}/{s.index:03d}"))
    return samples


# ----------------------------------------------------------------------------------------------- YOLO format
def _yolo_class_names(root: Path) -> tuple[str, ...] | None:
    if (root / "classes.txt").is_file():
        names = [line.strip() for line in (root / "classes.txt").read_text().splitlines() if line.strip()]
        if not names:
            raise PotpourriError(f"{root / 'classes.txt'} is empty; write one class name per line")
        return tuple(names)
    for yaml_name in ("data.yaml", "dataset.yaml"):
        if (root / yaml_name).is_file():
            import yaml

            try:
                names = (yaml.safe_load((root / yaml_name).read_text()) or {}).get("names")
            except yaml.YAMLError as exc:
                raise PotpourriError(f"{root / yaml_name} is not valid YAML ({exc.__class__.__name__})") from None
            if isinstance(names, dict):  # ultralytics style {0: name, 1: name}
                if sorted(names) != list(range(len(names))):
                    raise PotpourriError(f"{root / yaml_name}: 'names' keys must be 0..{len(names) - 1}")
                names = [names[k] for k in range(len(names))]
            if not isinstance(names, list) or not names:
                raise PotpourriError(f"{root / yaml_name} has no 'names' list; add names: [class0, class1, ...]")
            return tuple(str(n) for n in names)
    return None


def parse_yolo_labels(
    text: str, *, path: Path | str, width: int, height: int, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Parse one YOLO label file's text into pixel boxes and labels; empty text means no objects."""
    boxes, labels = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 5:
            raise PotpourriError(f"{where}: expected 'class cx cy w h' (5 numbers), got {len(fields)} fields")
        try:
            values = [float(v) for v in fields]
        except ValueError:
            raise PotpourriError(f"{where}: '{line.strip()}' is not five numbers") from None
        cls, cx, cy, w, h = values
        if cls != int(cls) or cls < 0 or (num_classes is not None and cls >= num_classes):
            known = f"0..{num_classes - 1}" if num_classes is not None else "non-negative integers"
            raise PotpourriError(f"{where}: unknown class id {fields[0]}; class ids are {known}")
        if not all(math.isfinite(v) for v in values) or w <= 0 or h <= 0:
            raise PotpourriError(f"{where}: box width and height must be positive, got w={w} h={h}")
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        if min(x1, y1) < -_NORM_SLACK or max(x2, y2) > 1 + _NORM_SLACK:
            raise PotpourriError(
                f"{where}: box ({x1:.4f}, {y1:.4f}, {x2:.4f}, {y2:.4f}) lies outside the image; YOLO coordinates "
                "are normalised centre/size in [0, 1]"
            )
        x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
        boxes.append((x1 * width, y1 * height, x2 * width, y2 * height))
        labels.append(int(cls))
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def read_yolo(root: str | os.PathLike) -> tuple[list[DetectionSample], tuple[str, ...], list[str]]:
    """Samples of a YOLO folder (``images/`` + ``labels/``), its class names and notes."""
    from potpourri.core.imaging import IMAGE_SUFFIXES, read_rgb

    root = Path(root)
    if not (root / "images").is_dir() or not (root / "labels").is_dir():
        raise PotpourriError(f"'{root}' is not a YOLO folder: it needs images/ and labels/; {_LAYOUT_HELP}")
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PotpourriError(f"'{root / 'images'}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    names = _yolo_class_names(root)
    notes = [] if names else ["no classes.txt nor data.yaml: classes named by id"]
    samples = []
    for path in images:
        label_path = root / "labels" / f"{path.stem}.txt"
        if not label_path.is_file():
            raise PotpourriError(
                f"{path}: no label file {label_path}; create an empty one for an image without objects"
            )
        image = read_rgb(path)
        boxes, labels = parse_yolo_labels(
            label_path.read_text(), path=label_path, width=image.shape[1], height=image.shape[0],
            num_classes=len(names) if names else None,
        )  # fmt: skip
        samples.append(DetectionSample(image, boxes, labels, path.name))
    if names is None:
        top = max((int(s.labels.max()) for s in samples if len(s.labels)), default=0)
        names = tuple(f"class_{k}" for k in range(top + 1))
    return samples, names, notes


# ----------------------------------------------------------------------------------------------- COCO format
def read_coco(
    json_path: str | os.PathLike, image_root: str | os.PathLike | None = None
) -> tuple[list[DetectionSample], tuple[str, ...], list[str]]:
    """Samples of a COCO ``instances.json`` (images beside it or in ``images/``), class names and notes."""
    from potpourri.core.imaging import read_rgb

    json_path = Path(json_path)
    try:
        coco = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PotpourriError(f"{json_path}: cannot read COCO json ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "categories")):
        raise PotpourriError(f"{json_path}: not a COCO detection file (needs 'images' and 'categories' lists)")
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    if not categories:
        raise PotpourriError(f"{json_path}: 'categories' is empty; list the classes as {{'id': 1, 'name': ...}}")
    index_of = {c["id"]: i for i, c in enumerate(categories)}
    names = tuple(str(c.get("name", f"class_{c['id']}")) for c in categories)
    if image_root is None:
        image_root = json_path.parent / "images" if (json_path.parent / "images").is_dir() else json_path.parent
    image_root = Path(image_root)
    images = {img["id"]: img for img in coco["images"]}
    per_image: dict[int, list[tuple[tuple[float, float, float, float], int]]] = {i: [] for i in images}
    crowd = 0
    for ann in coco.get("annotations", []):
        ann_id = ann.get("id", "?")
        if ann.get("image_id") not in images:
            raise PotpourriError(f"{json_path}: annotation {ann_id} refers to unknown image_id {ann.get('image_id')}")
        if ann.get("category_id") not in index_of:
            raise PotpourriError(
                f"{json_path}: annotation {ann_id} has unknown category_id {ann.get('category_id')}; "
                f"known ids are {sorted(index_of)}"
            )
        if ann.get("iscrowd", 0):
            crowd += 1
            continue
        image = images[ann["image_id"]]
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise PotpourriError(f"{json_path}: annotation {ann_id} bbox must be [x, y, width, height]")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            raise PotpourriError(f"{json_path}: annotation {ann_id} has an empty box (width {w}, height {h})")
        width, height = float(image["width"]), float(image["height"])
        if x < -_PIXEL_SLACK or y < -_PIXEL_SLACK or x + w > width + _PIXEL_SLACK or y + h > height + _PIXEL_SLACK:
            raise PotpourriError(
                f"{json_path}: annotation {ann_id} box [{x}, {y}, {w}, {h}] lies outside image "
                f"'{image.get('file_name')}' ({int(width)}x{int(height)}); COCO boxes are [x, y, width, height] pixels"
            )
        box = (max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height))
        per_image[ann["image_id"]].append((box, index_of[ann["category_id"]]))
    samples = []
    for image_id, info in images.items():
        pixels = read_rgb(image_root / info["file_name"])
        if pixels.shape[:2] != (int(info["height"]), int(info["width"])):
            raise PotpourriError(
                f"{image_root / info['file_name']}: image is {pixels.shape[1]}x{pixels.shape[0]} but the json says "
                f"{info['width']}x{info['height']}"
            )
        found = per_image[image_id]
        samples.append(DetectionSample(pixels, [b for b, _ in found], [c for _, c in found], info["file_name"]))
    notes = [f"{crowd} iscrowd annotations left out"] if crowd else []
    return samples, names, notes


# ----------------------------------------------------------------------------------------------- one entry point
def resize_sample(sample: DetectionSample, size: int) -> DetectionSample:
    """The sample resized to ``size``×``size`` (no letterbox), boxes scaled with it."""
    height, width = sample.image.shape[:2]
    if (height, width) == (size, size):
        return sample
    image = np.asarray(Image.fromarray(sample.image).resize((size, size), Image.Resampling.BILINEAR))
    scale = np.array([size / width, size / height, size / width, size / height], np.float32)
    return DetectionSample(image, sample.boxes * scale, sample.labels.copy(), sample.name)


def read_detection_data(
    spec: str, *, image_size: int, per_kind: int = 20, test_fraction: float = 0.2, seed: int = 0
) -> DetectionData:
    """Read ``--data`` (``ds-synth:<category>``, a YOLO folder or a COCO json) into train/test samples.

    Example:
        data = read_detection_data("ds-synth:brick", image_size=256); data.class_names  # ('scratch', ..., 'dent')
    """
    from potpourri.data.synth import CATEGORIES, DEFECTS, MULTI

    if spec.startswith("ds-synth:"):
        category = spec.split(":", 1)[1]
        if category not in CATEGORIES:
            raise PotpourriError(f"unknown DS-Synth category '{category}'; choose from {', '.join(CATEGORIES)}")
        kinds = (*DEFECTS, MULTI)
        train = synth_detection_samples(category, "train", per_kind * len(kinds), seed=seed, size=image_size)
        train += synth_detection_samples(category, "train", max(1, per_kind // 2), seed=seed, size=image_size,
                                         kinds=("good",))  # fmt: skip
        test_n = max(2, per_kind // 2) * len(kinds)
        test = synth_detection_samples(category, "test", test_n, seed=seed, size=image_size)
        note = f"DS-Synth {category}: train from the photo's training rows, test from its held-out rows"
        return DetectionData(train, test, tuple(DEFECTS), "ds-synth", [note])
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        samples, names, notes = read_coco(path)
        layout = "coco"
    elif path.is_dir() and (path / "labels").is_dir():
        samples, names, notes = read_yolo(path)
        layout = "yolo"
    elif path.is_dir() and any(path.glob("*.json")):
        candidates = sorted(path.glob("*.json"))
        samples, names, notes = read_coco(candidates[0])
        layout, notes = "coco", [*notes, f"COCO annotations from {candidates[0].name}"]
    else:
        raise PotpourriError(f"--data '{spec}' is neither a YOLO folder nor a COCO json; {_LAYOUT_HELP}")
    if len(samples) < 2:
        raise PotpourriError(f"'{spec}' holds {len(samples)} image; need at least 2 (one to train, one to test)")
    sizes = {s.image.shape[:2] for s in samples}
    if sizes != {(image_size, image_size)}:
        notes.append(f"images resized to {image_size}x{image_size} without letterbox (found sizes {sorted(sizes)[:3]})")
    samples = [resize_sample(s, image_size) for s in samples]
    order = np.random.default_rng(seed).permutation(len(samples))
    n_test = min(len(samples) - 1, max(1, round(test_fraction * len(samples))))
    test = [samples[i] for i in sorted(order[:n_test])]
    train = [samples[i] for i in sorted(order[n_test:])]
    notes.append(f"{len(train)} train / {len(test)} test images (seeded split, --test-fraction {test_fraction})")
    return DetectionData(train, test, names, layout, notes)
