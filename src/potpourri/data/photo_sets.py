"""Held-out MVTec-layout inspection sets built from scikit-image photos that DS-Synth does not use (issue 21).

Two textures and one regular structure, each seeded and written in the MVTec-AD layout:
- ``retina``: crops of the inside of the fundus photo (``skimage.data.retina``), an organic texture with vessels;
- ``stars``: crops of the Hubble deep field (``skimage.data.hubble_deep_field``), sparse points on black;
- ``coins``: a 3 x 3 tray of the 24 real coins of ``skimage.data.coins``, each at a random rotation and small jitter.

Train crops come from the top 62.5 % of the photo's rows and test crops from the rest (``coins``: the same coin pool,
new arrangements). Every defect is painted onto its clean image, and the image is the clean one outside the mask,
so the mask is exactly the changed pixels' region. Example:
    folder = photo_set("coins", seed=1)            # cached: <cache>/photo-sets/v1-seed1-size160/coins
    data = read_folder(str(folder))                # train/good, test/<kind>, ground_truth/<kind>
"""

from __future__ import annotations

import shutil
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from potpourri.core.errors import PotpourriError

__all__ = ["DEFECTS", "PHOTO_SETS", "VERSION", "make_image", "make_pair", "photo_set", "write_photo_set"]

VERSION = "1"
SPLIT_FRACTION = 0.625
# name -> (defect kinds, normal training images, good test images, test images per defect kind)
PHOTO_SETS: dict[str, tuple[tuple[str, ...], int, int, int]] = {
    "retina": (("scratch", "stain", "swap"), 40, 15, 10),
    "stars": (("scratch", "stain", "swap"), 40, 15, 10),
    "coins": (("missing", "scratch", "dent", "small"), 40, 20, 10),
}
DEFECTS = sorted({kind for kinds, *_ in PHOTO_SETS.values() for kind in kinds})
# centroids of the 24 coins in skimage.data.coins (background-subtracted threshold, measured once)
_COIN_CENTERS = [(43, 335), (51, 155), (51, 216), (53, 276), (54, 44), (56, 100), (119, 271), (124, 205), (125, 45),
                 (125, 102), (125, 337), (127, 153), (186, 347), (193, 212), (194, 274), (195, 102), (197, 43),
                 (198, 154), (260, 46), (261, 172), (263, 244), (263, 301), (266, 114), (268, 358)]  # fmt: skip
_CELL = 64  # one tray cell (and one coin sprite), px


@cache
def _texture(name: str) -> np.ndarray:
    """The usable region of a texture photo, (H, W, 3) uint8."""
    import skimage.data

    if name == "retina":
        return np.ascontiguousarray(skimage.data.retina()[260:1150, 260:1150, :3])  # a square inside the fundus disc
    return np.ascontiguousarray(skimage.data.hubble_deep_field()[:, :, :3])


@cache
def _coins() -> list[tuple[np.ndarray, np.ndarray]]:
    """The 24 coins as (64 x 64 grey sprite, boolean footprint) pairs, footprints found by Otsu in each cell."""
    import skimage.data
    from skimage.filters import threshold_otsu

    photo = np.pad(skimage.data.coins().astype(np.float32), _CELL, mode="edge")
    half = _CELL // 2
    out = []
    for row, col in _COIN_CENTERS:
        cell = photo[row + _CELL - half : row + _CELL + half, col + _CELL - half : col + _CELL + half]
        labels, count = ndimage.label(ndimage.gaussian_filter(cell, 1.5) > threshold_otsu(cell))
        sizes = ndimage.sum_labels(np.ones_like(cell), labels, index=range(1, count + 1))
        footprint = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))  # the coin: the largest part
        out.append((cell, ndimage.binary_dilation(footprint, iterations=1)))
    return out


def _crop(name: str, split: str, rng: np.random.Generator, size: int) -> np.ndarray:
    photo = _texture(name)
    side = 192 if name == "retina" else 160  # source pixels per crop (resized to ``size``)
    cut = int(photo.shape[0] * SPLIT_FRACTION)
    rows = (0, cut) if split == "train" else (cut, photo.shape[0])
    top = int(rng.integers(rows[0], rows[1] - side + 1))
    left = int(rng.integers(0, photo.shape[1] - side + 1))
    crop = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BICUBIC))


def _tray(rng: np.random.Generator, size: int, defect: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 3 x 3 tray of coins resized to ``size``: (clean, painted, mask of the one defective cell)."""
    coins = _coins()
    background = float(np.median([c[~f].mean() for c, f in coins]))
    canvas = np.full((3 * _CELL, 3 * _CELL), background, np.float32)
    canvas += ndimage.gaussian_filter(rng.normal(0, 6, canvas.shape), 2).astype(np.float32)
    clean_cells = []
    for index in range(9):
        sprite, footprint = coins[int(rng.integers(len(coins)))]
        angle = float(rng.uniform(0, 360))
        sprite = ndimage.rotate(sprite, angle, reshape=False, order=1, mode="nearest")
        footprint = ndimage.rotate(footprint.astype(np.float32), angle, reshape=False, order=1) > 0.5
        dy, dx = (int(v) for v in rng.integers(-3, 4, 2))
        sprite, footprint = np.roll(sprite, (dy, dx), (0, 1)), np.roll(footprint, (dy, dx), (0, 1))
        row, col = divmod(index, 3)
        window = canvas[row * _CELL : (row + 1) * _CELL, col * _CELL : (col + 1) * _CELL]
        window[footprint] = sprite[footprint] * float(rng.uniform(0.95, 1.05))
        clean_cells.append((row, col, footprint))
    mask = np.zeros(canvas.shape, bool)
    painted = canvas.copy()
    if defect is not None:
        row, col, footprint = clean_cells[int(rng.integers(9))]
        cell = (slice(row * _CELL, (row + 1) * _CELL), slice(col * _CELL, (col + 1) * _CELL))
        window, cell_mask = painted[cell], mask[cell]
        if defect == "missing":
            region = ndimage.binary_dilation(footprint, iterations=2)
            window[region] = background + ndimage.gaussian_filter(rng.normal(0, 6, window.shape), 2)[region]
            cell_mask |= region
        elif defect == "small":  # a smaller part in the slot: the whole old footprint changes
            region = ndimage.binary_dilation(footprint, iterations=2)
            shrunk = ndimage.zoom(window, 0.65, order=1)
            offset = (_CELL - shrunk.shape[0]) // 2
            small = np.full_like(window, background)
            small[offset : offset + shrunk.shape[0], offset : offset + shrunk.shape[1]] = shrunk
            window[region] = small[region]
            cell_mask |= region
        else:
            inside = np.argwhere(ndimage.binary_erosion(footprint, iterations=6))
            cy, cx = inside[int(rng.integers(len(inside)))]
            stroke = np.zeros((_CELL, _CELL), np.uint8)
            if defect == "scratch":
                angle = rng.uniform(0, np.pi)
                length = rng.uniform(10, 18)
                ends = [(cx - length * np.cos(angle), cy - length * np.sin(angle)),
                        (cx + length * np.cos(angle), cy + length * np.sin(angle))]  # fmt: skip
                pil = Image.fromarray(stroke)
                ImageDraw.Draw(pil).line([tuple(map(float, e)) for e in ends], fill=1, width=2)
                region = np.asarray(pil).astype(bool) & footprint
                window[region] = 250.0 if rng.random() < 0.5 else 20.0
            else:  # dent: a dark pit
                yy, xx = np.mgrid[:_CELL, :_CELL]
                radius = rng.uniform(3.5, 6)
                region = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2) & footprint
                window[region] *= 0.35
            cell_mask |= region
    small = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.BILINEAR)
    return _tinted(canvas, size), _tinted(painted, size), np.asarray(small) > 0  # the mask covers every changed pixel


def _tinted(gray: np.ndarray, size: int) -> np.ndarray:
    """A grey canvas resized to ``size`` and tinted slightly bronze, (S, S, 3) uint8."""
    small = np.asarray(
        Image.fromarray(gray.clip(0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    )
    return np.stack([small, small, (small * 0.92).astype(np.uint8)], axis=-1)


def _blob(rng: np.random.Generator, size: int, radius: tuple[float, float]) -> np.ndarray:
    """A random smooth blob (boolean, ``size`` x ``size``) away from the border."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
    ry, rx = rng.uniform(*radius, 2) * size
    angle = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
    v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
    wobble = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), size / 20) * 6
    return (u / rx) ** 2 + (v / ry) ** 2 + wobble < 1


def _paint_texture(image: np.ndarray, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A texture defect: (painted image, mask of the painted region)."""
    size = image.shape[0]
    painted = image.astype(np.float32)
    if defect == "scratch":
        stroke = Image.new("L", (size, size))
        points = [tuple(rng.uniform(0.15 * size, 0.85 * size, 2))]
        for _ in range(3):
            step = rng.normal(0, 0.12 * size, 2)
            points.append(tuple(np.clip(np.asarray(points[-1]) + step, 4, size - 5)))
        ImageDraw.Draw(stroke).line(points, fill=255, width=2)
        mask = np.asarray(stroke) > 0
        colour = np.asarray((235, 235, 220) if rng.random() < 0.5 else (25, 20, 20), np.float32)
        painted[mask] = colour
    elif defect == "stain":
        mask = _blob(rng, size, (0.05, 0.1))
        colour = np.asarray(rng.choice([(40, 160, 60), (200, 190, 40), (60, 60, 200)]), np.float32)
        painted[mask] = 0.45 * painted[mask] + 0.55 * colour
    elif defect == "swap":  # a square from elsewhere in the crop, turned a quarter: the structure breaks
        side = int(rng.integers(size // 8, size // 5))
        top, left = (int(v) for v in rng.integers(4, size - side - 4, 2))
        source_top, source_left = (int(v) for v in rng.integers(0, size - side, 2))
        patch = np.rot90(image[source_top : source_top + side, source_left : source_left + side], 1)
        painted[top : top + side, left : left + side] = patch
        mask = np.zeros((size, size), bool)
        mask[top : top + side, left : left + side] = True
    else:
        raise PotpourriError(f"unknown texture defect '{defect}'; choose scratch, stain or swap")
    changed = np.abs(painted - image).max(-1) > 0
    return painted.clip(0, 255).astype(np.uint8), mask & changed if defect == "swap" else mask


def make_pair(
    name: str, split: str, index: int, *, seed: int = 0, size: int = 160, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean image, image, mask): the image is the clean one outside the mask; the same arguments, the same bytes."""
    if name not in PHOTO_SETS:
        raise PotpourriError(f"unknown photo set '{name}'; choose from {', '.join(PHOTO_SETS)}")
    if defect is not None and defect not in PHOTO_SETS[name][0]:
        raise PotpourriError(f"set '{name}' has no defect '{defect}'; choose from {', '.join(PHOTO_SETS[name][0])}")
    kind = 1 + DEFECTS.index(defect) if defect else 0
    rng = np.random.default_rng([seed, list(PHOTO_SETS).index(name), ("train", "test").index(split), index, kind])
    if name == "coins":
        clean, painted, mask = _tray(rng, size, defect)
    else:
        clean = _crop(name, split, rng, size)
        painted, mask = (clean, np.zeros((size, size), bool)) if defect is None else _paint_texture(clean, defect, rng)
    return clean, np.where(mask[..., None], painted, clean), mask


def make_image(
    name: str, split: str, index: int, *, seed: int = 0, size: int = 160, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One image of a set and its defect mask: ((S, S, 3) uint8, (S, S) bool)."""
    _, image, mask = make_pair(name, split, index, seed=seed, size=size, defect=defect)
    return image, mask


def write_photo_set(root: str | Path, name: str, *, seed: int = 0, size: int = 160) -> Path:
    """Write one set in the MVTec-AD layout under ``root/name``; returns that folder."""
    kinds, n_train, n_good, per_kind = PHOTO_SETS.get(name, ((), 0, 0, 0))
    if not kinds:
        raise PotpourriError(f"unknown photo set '{name}'; choose from {', '.join(PHOTO_SETS)}")
    folder = Path(root) / name
    jobs: list[tuple[str, str, int, str | None]] = [("train", "good", i, None) for i in range(n_train)]
    jobs += [("test", "good", i, None) for i in range(n_good)]
    jobs += [("test", kind, i, kind) for kind in kinds for i in range(per_kind)]
    for split, kind, index, defect in jobs:
        image, mask = make_image(name, split, index, seed=seed, size=size, defect=defect)
        (folder / split / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / split / kind / f"{index:03d}.png")
        if defect is not None:
            (folder / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "ground_truth" / kind / f"{index:03d}_mask.png")
    return folder


def photo_set(name: str, *, seed: int = 0, size: int = 160) -> Path:
    """The MVTec-AD folder of one set, generated once into the cache (same seed, same bytes)."""
    from potpourri.core.weights import cache_root

    root = cache_root().parent / "photo-sets" / f"v{VERSION}-seed{seed}-size{size}"
    if not (root / name).is_dir():  # written beside it, then renamed: no half-written set survives a kill
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
        try:
            write_photo_set(staging, name, seed=seed, size=size).rename(root / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return root / name
