"""Copy-paste defect synthesis: the cheap, non-diffusion baseline generator for the Defect-Gen experiment.

``fit`` cuts every defect region (with its class-id mask) out of the few real training images; ``sample`` pastes
1-3 of them, flipped / turned at random, onto defect-free images (``normals``, else the training images
themselves) with a feathered alpha confined to the defect's own pixels (a ramp inside wide defects; thin ones stay
opaque) and an optional tone shift that matches the region's surroundings to the target's (a cheap stand-in for
Poisson blending, which also matches the boundary). Every changed pixel
is labelled: outside the pasted masks the target image is untouched.

The ``DefectGenerator`` protocol is shared with ``potpourri.segment.defectgen.DefectGenLite``.

Example:
    gen = CopyPaste().fit(images, masks, normals=good_images)   # (N,H,W,3) uint8, (N,H,W) int64, (M,H,W,3)
    synthetic_images, synthetic_masks = gen.sample(40, seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from scipy import ndimage

from potpourri.core.errors import PotpourriError
from potpourri.core.training import TrainOptions

__all__ = ["CopyPaste", "CopyPasteConfig", "DefectGenerator", "DefectRegion", "check_generator_inputs"]


@runtime_checkable
class DefectGenerator(Protocol):
    """A synthetic-defect generator: learns from few real (image, class-id mask) pairs, then samples new pairs."""

    def fit(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        normals: np.ndarray | None = None,
        *,
        options: TrainOptions | None = None,
    ) -> DefectGenerator:
        """Learn from (N, H, W, 3) uint8 images, (N, H, W) int64 class-id masks and optional defect-free images;
        ``options`` (a ``TrainOptions``: device, precision, checkpoints) for generators that train."""
        ...

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` new images (n, H, W, 3) uint8 with their (n, H, W) int64 class-id masks; same seed, same output."""
        ...


def check_generator_inputs(
    images: np.ndarray, masks: np.ndarray, normals: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate the protocol's ``fit`` inputs; returns (images, int64 masks, normals) or raises one line."""
    images, masks = np.asarray(images), np.asarray(masks)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise PotpourriError(f"images must be (N, H, W, 3) uint8, got {images.dtype} {images.shape}")
    if not len(images):
        raise PotpourriError("no training images given")
    if not np.issubdtype(masks.dtype, np.integer) or masks.shape != images.shape[:3]:
        raise PotpourriError(
            f"masks must be integer class ids of shape {images.shape[:3]} (one per image), got {masks.dtype} "
            f"{masks.shape}"
        )
    if masks.min() < 0:
        raise PotpourriError(f"masks hold negative class ids ({int(masks.min())}); 0 is background, 1.. defects")
    if normals is not None:
        normals = np.asarray(normals)
        if normals.ndim != 4 or normals.shape[1:] != images.shape[1:] or normals.dtype != np.uint8:
            raise PotpourriError(
                f"normals must be (M, {images.shape[1]}, {images.shape[2]}, 3) uint8 like the images, got "
                f"{normals.dtype} {normals.shape}"
            )
        if not len(normals):
            normals = None
    return images, masks.astype(np.int64), normals


@dataclass
class CopyPasteConfig:
    """How regions are cut, transformed and blended."""

    defects_per_image: tuple[int, int] = (1, 3)  # inclusive range of regions pasted into one sample
    merge_px: int = 2  # defect pixels closer than this form one region (keeps a crack's fragments together)
    margin_px: int = 3  # context ring around a region used to match tones
    feather_px: float = 2.0  # width of the alpha ramp inside a wide defect's edge (0 = hard paste)
    match_tone: bool = True  # shift the pasted pixels by (target ring mean - source ring mean)
    flip: bool = True
    rotate: bool = True  # random quarter turns (square crops keep their size)
    balance_classes: bool = True  # pick a class uniformly first, then a region holding it
    max_tries: int = 10  # placements tried to avoid covering already-pasted defects


@dataclass(frozen=True)
class DefectRegion:
    """One defect cut out of a training image: pixels and class ids in its bounding box, plus a context ring."""

    pixels: np.ndarray  # (h, w, 3) float32, the source image in the box
    classes: np.ndarray  # (h, w) int64, class ids inside the defect, 0 elsewhere
    ring: np.ndarray  # (h, w) bool, background pixels within margin_px of the defect
    source: int  # index of the training image it came from


def _blend_alpha(support: np.ndarray, feather_px: float) -> np.ndarray:
    """Alpha in [0, 1]: zero outside ``support``, a linear ramp over ``feather_px`` pixels inside its edge.

    The ramp is scaled per connected part to its own half-width, so a thin defect (a 1-2 px scratch) stays opaque
    instead of fading away; only wide defects get a soft rim.
    """
    if feather_px <= 0:
        return support.astype(np.float32)
    depth = ndimage.distance_transform_edt(support)  # 1 on the outermost defect pixels
    parts, count = ndimage.label(support)
    if not count:
        return np.zeros(support.shape, np.float32)
    peak = np.asarray(ndimage.maximum(depth, parts, index=np.arange(1, count + 1)), np.float64)
    ramp = np.minimum(feather_px, peak)[np.maximum(parts, 1) - 1]
    return (np.clip(depth / ramp, 0.0, 1.0) * support).astype(np.float32)


class CopyPaste:
    """Copy real defect regions onto defect-free images (the baseline of the Defect-Gen experiment).

    Example:
        images, masks = CopyPaste().fit(real_images, real_masks, normals=good).sample(32, seed=1)
    """

    name = "copy-paste"

    def __init__(self, config: CopyPasteConfig | None = None) -> None:
        self.config = config or CopyPasteConfig()
        lo, hi = self.config.defects_per_image
        if not 1 <= lo <= hi:
            raise PotpourriError(f"defects_per_image {self.config.defects_per_image} must be 1 <= low <= high")
        self.regions: list[DefectRegion] = []
        self.targets: np.ndarray | None = None
        self.target_masks: np.ndarray | None = None

    def fit(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        normals: np.ndarray | None = None,
        *,
        options: TrainOptions | None = None,
    ) -> CopyPaste:
        """Cut every defect region out of ``images``; paste targets are ``normals`` (else ``images``). Nothing trains
        here, so ``options`` has nothing to place: it is taken for the ``DefectGenerator`` contract only."""
        images, masks, normals = check_generator_inputs(images, masks, normals)
        cfg = self.config
        self.regions = []
        for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
            defect = mask > 0
            grown = ndimage.binary_dilation(defect, iterations=cfg.merge_px) if cfg.merge_px else defect
            labels, _ = ndimage.label(grown)
            for label_id, box in enumerate(ndimage.find_objects(labels), start=1):
                if box is None:
                    continue
                y0, y1 = max(0, box[0].start - cfg.margin_px), min(mask.shape[0], box[0].stop + cfg.margin_px)
                x0, x1 = max(0, box[1].start - cfg.margin_px), min(mask.shape[1], box[1].stop + cfg.margin_px)
                part = labels[y0:y1, x0:x1] == label_id
                support = part & defect[y0:y1, x0:x1]
                if not support.any():
                    continue
                near = ndimage.binary_dilation(support, iterations=cfg.margin_px) & ~defect[y0:y1, x0:x1]
                classes = np.where(support, mask[y0:y1, x0:x1], 0)
                self.regions.append(DefectRegion(image[y0:y1, x0:x1].astype(np.float32), classes, near, index))
        if not self.regions:
            raise PotpourriError("the masks hold no defect pixels: copy-paste needs at least one labelled defect")
        if normals is not None:
            self.targets, self.target_masks = normals, np.zeros(normals.shape[:3], np.int64)
        else:
            self.targets, self.target_masks = images, masks
        return self

    def region_classes(self) -> list[int]:
        """The defect class ids found in the training masks (what ``sample`` can produce)."""
        return sorted({int(c) for r in self.regions for c in np.unique(r.classes) if c > 0})

    def _choose_region(self, rng: np.random.Generator) -> DefectRegion:
        if not self.config.balance_classes:
            return self.regions[int(rng.integers(len(self.regions)))]
        cls = int(rng.choice(self.region_classes()))
        holders = [r for r in self.regions if (r.classes == cls).any()]
        return holders[int(rng.integers(len(holders)))]

    def _transform(self, region: DefectRegion, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        arrays = [region.pixels, region.classes, region.ring]
        if self.config.flip and rng.random() < 0.5:
            arrays = [a[:, ::-1] for a in arrays]
        if self.config.flip and rng.random() < 0.5:
            arrays = [a[::-1] for a in arrays]
        if self.config.rotate:
            turns = int(rng.integers(4))
            arrays = [np.rot90(a, turns) for a in arrays]
        return tuple(np.ascontiguousarray(a) for a in arrays)

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` pasted images (n, H, W, 3) uint8 and their class-id masks (n, H, W) int64; seeded."""
        if self.targets is None or self.target_masks is None:
            raise PotpourriError("CopyPaste is not fitted: call fit(images, masks[, normals]) first")
        if n < 0:
            raise PotpourriError(f"n must be >= 0, got {n}")
        cfg = self.config
        rng = np.random.default_rng(seed)
        height, width = self.targets.shape[1:3]
        out_images = np.empty((n, height, width, 3), np.uint8)
        out_masks = np.empty((n, height, width), np.int64)
        for i in range(n):
            target = int(rng.integers(len(self.targets)))
            canvas = self.targets[target].astype(np.float32)
            mask = self.target_masks[target].copy()
            for _ in range(int(rng.integers(cfg.defects_per_image[0], cfg.defects_per_image[1] + 1))):
                pixels, classes, ring = self._transform(self._choose_region(rng), rng)
                h, w = classes.shape
                if h > height or w > width:  # a turned region of a non-square image may not fit
                    continue
                support = classes > 0
                for _ in range(cfg.max_tries):  # prefer a spot that covers no defect pasted before
                    y, x = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
                    if not (mask[y : y + h, x : x + w][support] > 0).any():
                        break
                window = canvas[y : y + h, x : x + w]
                layer = pixels
                if cfg.match_tone and ring.any():
                    target_ring = ring & (mask[y : y + h, x : x + w] == 0)
                    if target_ring.any():
                        layer = pixels + (window[target_ring].mean(0) - pixels[ring].mean(0))
                alpha = _blend_alpha(support, cfg.feather_px)[..., None]  # (h, w, 1)
                canvas[y : y + h, x : x + w] = window * (1 - alpha) + layer * alpha
                mask[y : y + h, x : x + w][support] = classes[support]  # the later region wins, as in DS-Synth
            out_images[i] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
            out_masks[i] = mask
        return out_images, out_masks
