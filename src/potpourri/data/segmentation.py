"""Segmentation data: DS-Synth, a Defect Spectrum category folder or images/ + masks/ folders, as arrays with a
seeded train/test split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from potpourri.core.errors import PotpourriError

_LAYOUT_HELP = (
    "expected ds-synth:<category>, a Defect Spectrum category folder (image/<defect>/NNN.png + "
    "mask/<defect>/NNN_mask.png or rbg_mask/), or a folder with images/ and masks/ (class-id PNGs named "
    "<stem>.png or <stem>_mask.png)"
)


@dataclass
class SegmentationData:
    """Train and test arrays at one size, with class names (0 = background) and notes on what was done."""

    train_images: np.ndarray  # (N, S, S, 3) uint8
    train_masks: np.ndarray  # (N, S, S) int64
    test_images: np.ndarray
    test_masks: np.ndarray
    class_names: tuple[str, ...]
    layout: str
    notes: list[str] = field(default_factory=list)


def _resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    if image.shape[:2] == (size, size):
        return image, mask
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST))
    return image, mask


def _read_pairs(spec: str) -> tuple[list[tuple[np.ndarray, np.ndarray, str]], tuple[str, ...] | None, str]:
    """(image, mask, name) triples of a folder, its class names (None: unknown) and the layout's name."""
    from potpourri.core.imaging import IMAGE_SUFFIXES, read_mask, read_rgb
    from potpourri.data.layouts import DefectSpectrum

    root = Path(spec)
    if not root.is_dir():
        raise PotpourriError(f"--data '{spec}' is not a folder; {_LAYOUT_HELP}")
    if (root / "image").is_dir():
        dataset = DefectSpectrum(root.parent, root.name)
        pairs = []
        for index in range(len(dataset)):
            sample = dataset[index]
            pairs.append((sample.image, sample.mask, f"{sample.path.parent.name}/{sample.path.name}"))
        names = tuple(dataset.class_names) if dataset.class_names else None
        return pairs, names, "defect-spectrum"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise PotpourriError(f"'{root / 'images'}' holds no images; {_LAYOUT_HELP}")
        pairs = []
        for path in images:
            candidates = [root / "masks" / f"{path.stem}{suffix}.png" for suffix in ("", "_mask")]
            mask_path = next((c for c in candidates if c.is_file()), None)
            if mask_path is None:
                raise PotpourriError(f"{path}: no mask (expected {candidates[0]} or {candidates[1]})")
            image = read_rgb(path)
            pairs.append(
                (image, read_mask(mask_path, shape=image.shape[:2], image_path=path, eight_bit=True), path.name)
            )
        return pairs, None, "images+masks"
    raise PotpourriError(f"'{root}' has no image/ nor images/ + masks/ folders; {_LAYOUT_HELP}")


def read_segmentation_data(
    spec: str, *, image_size: int, per_kind: int = 10, test_fraction: float = 0.2, seed: int = 0
) -> SegmentationData:
    """Read ``--data`` into train/test arrays at ``image_size`` (see the module docstring for the layouts)."""
    from potpourri.data.synth import CATEGORIES, CLASSES, DEFECTS, MULTI, make_samples

    if spec.startswith("ds-synth:"):
        category = spec.split(":", 1)[1]
        if category not in CATEGORIES:
            raise PotpourriError(f"unknown DS-Synth category '{category}'; choose from {', '.join(CATEGORIES)}")
        kinds = (*DEFECTS, MULTI)
        gen = {"size": image_size, "kinds": kinds}
        train = make_samples(category, "train", per_kind * len(kinds), **gen)
        train += make_samples(category, "train", per_kind, size=image_size, kinds=("good",))
        test = make_samples(category, "test", max(2, per_kind // 2) * len(kinds), **gen)
        return SegmentationData(
            np.stack([s.image for s in train]),
            np.stack([s.mask for s in train]).astype(np.int64),
            np.stack([s.image for s in test]),
            np.stack([s.mask for s in test]).astype(np.int64),
            CLASSES,
            "ds-synth",
            [f"DS-Synth {category}: train from the photo's training rows, test from its held-out rows"],
        )
    pairs, names, layout = _read_pairs(spec)
    notes = []
    sizes = {p[0].shape[:2] for p in pairs}
    if sizes != {(image_size, image_size)}:
        notes.append(f"images resized to {image_size}x{image_size} (found sizes {sorted(sizes)[:3]})")
    resized = [_resize_pair(image, mask, image_size) for image, mask, _ in pairs]
    images = np.stack([r[0] for r in resized])
    masks = np.stack([r[1] for r in resized]).astype(np.int64)
    if names is None:
        top = int(masks.max())
        names = ("background", *(f"class_{k}" for k in range(1, max(top, 1) + 1)))
        notes.append(f"no classes.json: classes named by id (0..{len(names) - 1})")
    if len(images) < 2:
        raise PotpourriError(f"'{spec}' holds {len(images)} image; need at least 2 (one to train, one to test)")
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = min(len(images) - 1, max(1, round(test_fraction * len(images))))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    notes.append(f"{len(train)} train / {len(test)} test images (seeded split, --test-fraction {test_fraction})")
    return SegmentationData(images[train], masks[train], images[test], masks[test], tuple(names), layout, notes)
