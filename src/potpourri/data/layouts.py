"""Dataset layouts on disk, all returning one typed ``Sample``.

``ImageFolder(root)`` (classification, ``root/<class>/*.png``), ``MVTecAD(root, category, split)``,
``DefectSpectrum(root, category)`` (``rbg_mask`` or ``rgb_mask`` colour masks, class-index masks),
``Folder(normal_dir, abnormal_dirs, mask_dir)`` for a user's own data, and ``DSSynth`` (in memory, no files).

Bad input raises a one-line ``PotpourriError`` naming the file and the problem, never a silent skip: a defect
image without a mask, a mask whose size differs from its image, a corrupt or truncated image, an empty folder, an
unknown category, a transparent RGBA image. 16-bit images are scaled to 8 bits (``value >> 8``) and fully opaque
RGBA images lose their alpha channel.

Example:
    >>> ds = MVTecAD("/tmp/ds/MVTec-Synth", "brick", "test")  # doctest: +SKIP
    >>> s = ds[0]; s.image.shape, s.label, s.mask.shape, s.defect_classes, s.path  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from potpourri.core.errors import PotpourriError
from potpourri.core.imaging import IMAGE_SUFFIXES, read_mask
from potpourri.core.imaging import read_rgb as read_image

__all__ = ["DSSynth", "DefectSpectrum", "Folder", "ImageFolder", "MVTecAD", "Sample", "read_image"]

_COLOR_MASK_DIRS = ("rbg_mask", "rgb_mask")  # Defect Spectrum spells it both ways (pill uses rgb_mask)


@dataclass
class Sample:
    """One image with its ground truth; ``mask`` is class-index (0 = good) or None where the layout has none."""

    image: Any  # (H, W, 3) uint8 array, or whatever ``transform`` returns
    label: int  # class index (ImageFolder) or 0 = good / 1 = defective (anomaly layouts)
    mask: np.ndarray | None  # (H, W) uint8
    defect_classes: tuple[str, ...]
    path: Path | None


# ----------------------------------------------------------------------------------------------- reading
def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise PotpourriError(f"{folder}: folder not found")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PotpourriError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def _subdirs(folder: Path) -> list[str]:
    return (
        sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []
    )


def _check_category(root: Path, category: str) -> Path:
    if not root.is_dir():
        raise PotpourriError(f"{root}: dataset root not found")
    if not (root / category).is_dir():
        found = _subdirs(root)
        raise PotpourriError(
            f"unknown category '{category}' in {root}; found: {', '.join(found) if found else 'no category folders'}"
        )
    return root / category


# ----------------------------------------------------------------------------------------------- base dataset
class _Layout:
    """Indexable list of (image path, label, mask path or None, defect classes); reads lazily, fails loudly."""

    _has_masks = False

    def __init__(self, transform: Callable[[np.ndarray], Any] | None = None) -> None:
        self.transform = transform
        self.items: list[tuple[Path, int, Path | None, tuple[str, ...]]] = []

    def __len__(self) -> int:
        return len(self.items)

    def _read_mask(self, mask_path: Path, shape: tuple[int, int], image_path: Path) -> np.ndarray:
        return read_mask(mask_path, shape=shape, image_path=image_path, eight_bit=True)

    def __getitem__(self, index: int) -> Sample:
        image_path, label, mask_path, classes = self.items[index]
        image = read_image(image_path)
        mask = None if mask_path is None else self._read_mask(mask_path, image.shape[:2], image_path)
        if mask is None and self._has_masks:  # good images of a masked layout have an all-zero mask
            mask = np.zeros(image.shape[:2], np.uint8)
        image_out = self.transform(image) if self.transform else image
        return Sample(image_out, label, mask, classes, image_path)

    def validate(self) -> int:
        """Read every sample once (catches corrupt files and size mismatches up front); returns the count."""
        for i in range(len(self)):
            self[i]
        return len(self)


class ImageFolder(_Layout):
    """Classification layout ``root/<class>/<image>``; labels follow sorted class-folder names."""

    def __init__(self, root: str | os.PathLike, *, transform: Callable[[np.ndarray], Any] | None = None) -> None:
        super().__init__(transform)
        self.root = Path(root)
        if not self.root.is_dir():
            raise PotpourriError(f"{self.root}: folder not found")
        self.classes = _subdirs(self.root)
        if not self.classes:
            raise PotpourriError(f"{self.root}: no class folders found; expected root/<class>/<image>.png")
        for label, name in enumerate(self.classes):
            self.items += [(p, label, None, (name,)) for p in _list_images(self.root / name)]


class MVTecAD(_Layout):
    """MVTec AD layout: ``<category>/train/good``, ``test/<defect>``, ``ground_truth/<defect>/<stem>_mask.png``.

    Labels are 0 (good) / 1 (defect); masks are 0/1. ``require_masks=False`` keeps defect images without a mask
    (``mask_path`` None), as inspection does for image-level test sets.
    """

    _has_masks = True

    def __init__(
        self,
        root: str | os.PathLike,
        category: str,
        split: str = "test",
        *,
        transform: Callable[[np.ndarray], Any] | None = None,
        require_masks: bool = True,
    ) -> None:
        super().__init__(transform)
        self.root = Path(root)
        self.category = category
        base = _check_category(self.root, category)
        if split not in ("train", "test"):
            raise PotpourriError(f"unknown split '{split}'; MVTec AD has 'train' and 'test'")
        split_dir = base / split
        kinds = _subdirs(split_dir)
        if not kinds:
            raise PotpourriError(f"{split_dir}: no defect-type folders found (expected {split}/good, ...)")
        for kind in kinds:
            for image_path in _list_images(split_dir / kind):
                if kind == "good":
                    self.items.append((image_path, 0, None, ()))
                    continue
                mask_path = base / "ground_truth" / kind / f"{image_path.stem}_mask.png"
                if not mask_path.is_file():
                    if require_masks:
                        raise PotpourriError(f"{image_path}: defect image has no mask (expected {mask_path})")
                    mask_path = None  # image-level label only: pixel metrics skip it
                self.items.append((image_path, 1, mask_path, (kind,)))

    def _read_mask(self, mask_path: Path, shape: tuple[int, int], image_path: Path) -> np.ndarray:
        return (read_mask(mask_path, shape=shape, image_path=image_path, eight_bit=True) > 0).astype(np.uint8)


def _color_to_index(path: Path, shape: tuple[int, int], image_path: Path) -> np.ndarray:
    from potpourri.data.synth import PALETTE

    rgb = read_image(path)
    if rgb.shape[:2] != tuple(shape):
        raise PotpourriError(
            f"{path}: mask is {rgb.shape[1]}x{rgb.shape[0]} but its image {image_path} is {shape[1]}x{shape[0]}"
        )
    index = np.full(shape, 255, np.uint8)
    for k, colour in enumerate(PALETTE):
        index[(rgb == np.asarray(colour, np.uint8)).all(axis=2)] = k
    if (index == 255).any():
        y, x = np.argwhere(index == 255)[0]
        raise PotpourriError(f"{path}: colour {tuple(rgb[y, x])} at ({y}, {x}) is not in the Defect Spectrum palette")
    return index


class DefectSpectrum(_Layout):
    """Defect Spectrum layout ``<category>/{image,mask,rbg_mask|rgb_mask}/<defect>/NNN.png``; class-index masks.

    The class-index ``mask/<defect>/NNN_mask.png`` is used where present, else the colour mask (either spelling)
    is mapped back through the 11-colour palette. ``class_names`` comes from ``classes.json`` when one exists.
    """

    _has_masks = True

    def __init__(
        self, root: str | os.PathLike, category: str, *, transform: Callable[[np.ndarray], Any] | None = None
    ) -> None:
        super().__init__(transform)
        self.root = Path(root)
        self.category = category
        base = _check_category(self.root, category)
        self.class_names = self._class_table(base)
        kinds = _subdirs(base / "image")
        if not kinds:
            raise PotpourriError(f"{base / 'image'}: no defect-type folders found (expected image/<defect>/NNN.png)")
        self.color_mask_dir = next((base / d for d in _COLOR_MASK_DIRS if (base / d).is_dir()), None)
        self.color_masks: dict[Path, Path] = {}
        for kind in kinds:
            for image_path in _list_images(base / "image" / kind):
                mask_path = base / "mask" / kind / f"{image_path.stem}_mask.png"
                color_path = self._find_color_mask(base, kind, image_path.stem)
                if color_path is not None:
                    self.color_masks[image_path] = color_path
                if mask_path.is_file():
                    self.items.append((image_path, int(kind != "good"), mask_path, (kind,)))
                elif color_path is not None:
                    self.items.append((image_path, int(kind != "good"), color_path, (kind,)))
                elif kind == "good":
                    self.items.append((image_path, 0, None, ()))
                else:
                    raise PotpourriError(
                        f"{image_path}: defect image has no mask (expected {mask_path} or "
                        f"{base / 'rbg_mask' / kind / (image_path.stem + '_rbg_mask.png')})"
                    )

    @staticmethod
    def _class_table(base: Path) -> list[str] | None:
        for candidate in (base / "classes.json", base.parent / "classes.json"):
            if candidate.is_file():
                try:
                    table = json.loads(candidate.read_text())["classes"]
                    return [row["name"] for row in sorted(table, key=lambda r: r["id"])]
                except (ValueError, KeyError, TypeError) as exc:
                    message = f"{candidate}: not a class table ({exc}); expected {{'classes': [{{'id', 'name'}}, ...]}}"
                    raise PotpourriError(message) from None
        return None

    @staticmethod
    def _find_color_mask(base: Path, kind: str, stem: str) -> Path | None:
        for folder in _COLOR_MASK_DIRS:
            for spelling in _COLOR_MASK_DIRS:
                path = base / folder / kind / f"{stem}_{spelling}.png"
                if path.is_file():
                    return path
        return None

    def _read_mask(self, mask_path: Path, shape: tuple[int, int], image_path: Path) -> np.ndarray:
        if mask_path.parent.parent.name in _COLOR_MASK_DIRS:
            return _color_to_index(mask_path, shape, image_path)
        return read_mask(mask_path, shape=shape, image_path=image_path, eight_bit=True)

    def __getitem__(self, index: int) -> Sample:
        sample = super().__getitem__(index)
        if self.class_names and sample.mask is not None:  # name the classes actually present in the mask
            present = [int(k) for k in np.unique(sample.mask) if 0 < k < len(self.class_names)]
            sample.defect_classes = tuple(self.class_names[k] for k in present)
        return sample

    def color_mask(self, index: int) -> np.ndarray:
        """The palette colour mask of sample ``index`` as (H, W) class indices (from rbg_mask or rgb_mask)."""
        image_path = self.items[index][0]
        if image_path not in self.color_masks:
            raise PotpourriError(f"{image_path}: no colour mask under rbg_mask/ or rgb_mask/")
        shape = read_image(image_path).shape[:2]
        return _color_to_index(self.color_masks[image_path], shape, image_path)


class Folder(_Layout):
    """A user's own data: good images in ``normal_dir``, defects in ``abnormal_dirs``, masks in ``mask_dir``.

    A mask is ``mask_dir[/<abnormal dir name>]/<stem>[_mask].png``; with ``mask_dir`` set every defect needs one.
    """

    def __init__(
        self,
        normal_dir: str | os.PathLike,
        abnormal_dirs: str | os.PathLike | Sequence[str | os.PathLike] = (),
        mask_dir: str | os.PathLike | None = None,
        *,
        transform: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        super().__init__(transform)
        if isinstance(abnormal_dirs, (str, os.PathLike)):
            abnormal_dirs = [abnormal_dirs]
        self._has_masks = mask_dir is not None
        self.items += [(p, 0, None, ()) for p in _list_images(Path(normal_dir))]
        masks = Path(mask_dir) if mask_dir is not None else None
        if masks is not None and not masks.is_dir():
            raise PotpourriError(f"{masks}: mask folder not found")
        for folder in map(Path, abnormal_dirs):
            for image_path in _list_images(folder):
                mask_path = None
                if masks is not None:
                    candidates = [
                        d / f"{image_path.stem}{suffix}.png"
                        for d in (masks / folder.name, masks)
                        for suffix in ("_mask", "")
                    ]
                    mask_path = next((c for c in candidates if c.is_file()), None)
                    if mask_path is None:
                        raise PotpourriError(f"{image_path}: defect image has no mask (expected {candidates[0]})")
                self.items.append((image_path, 1, mask_path, (folder.name,)))


class DSSynth(_Layout):
    """DS-Synth generated in memory (no files): a ``Sample`` per ``make_samples`` entry, class-index masks."""

    _has_masks = True

    def __init__(
        self,
        category: str,
        split: str,
        n: int,
        *,
        seed: int = 0,
        size: int = 256,
        kinds: Sequence[str] | None = None,
        severity: float = 0.5,
        transform: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        from potpourri.data.synth import make_samples

        super().__init__(transform)
        self.samples = make_samples(category, split, n, seed=seed, size=size, kinds=kinds, severity=severity)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        s = self.samples[index]
        image = self.transform(s.image) if self.transform else s.image
        return Sample(image, int(s.kind != "good"), s.mask, s.defect_classes, None)
