"""Annotations in words: one sentence per defect mask, and a sentence parsed back into a region prior.

``describe_mask(mask, "scratch")`` reads the region's properties (area, centroid, second moments, connected parts,
how much of its moment ellipse it fills) and writes them in a closed vocabulary::

    "a small thin diagonal scratch in the upper left of the image, about a third of the image across"

``parse_description(sentence, size)`` inverts it into a ``RegionPrior``: the kind, a pixel box, an orientation and
a soft map (an oriented Gaussian), which can prompt a promptable segmenter (see ``segment/words.py``). Words are
coarse on purpose: the position is one of nine cells of a 3x3 grid and the extent one of six fractions, so the box
a sentence gives back is a rough one (measured in ``reproduce words-annotation``).

Reading order: vocabulary → region properties → ``describe_mask`` → ``RegionPrior`` → ``parse_description``.

Example:
    >>> import numpy as np
    >>> m = np.zeros((90, 90), bool); m[14, 3:27] = True; m[15, 3:27] = True
    >>> describe_mask(m, "scratch")
    'a small thin horizontal scratch in the upper left of the image, about a quarter of the image across'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from potpourri.core.errors import PotpourriError

__all__ = [
    "CELLS",
    "EXTENTS",
    "ORIENTATIONS",
    "SHAPES",
    "SIZES",
    "RegionPrior",
    "RegionWords",
    "describe_mask",
    "parse_description",
    "region_words",
]

# area as a fraction of the image: below 0.2 % tiny, below 1 % small, below 4 % medium, else large
SIZES = (("tiny", 0.002), ("small", 0.01), ("medium", 0.04), ("large", math.inf))
SHAPES = ("thin", "elongated", "round", "irregular", "cluster")
ORIENTATIONS = ("horizontal", "vertical", "diagonal", "anti-diagonal")  # diagonal: upper left to lower right
ROWS, COLS = ("upper", "middle", "lower"), ("left", "middle", "right")
CELLS = tuple("centre" if (r, c) == (1, 1) else f"{ROWS[r]} {COLS[c]}" for r in range(3) for c in range(3))
# the longer side of the region's box as a fraction of the image side
EXTENTS = (("a twentieth", 0.05), ("a tenth", 0.1), ("a fifth", 0.2), ("a quarter", 0.25), ("a third", 1 / 3),
           ("half", 0.5), ("most", 0.8))  # fmt: skip
KNOWN_KINDS = ("scratch", "crack", "stain", "hole", "contamination", "dent", "defect")

THIN_ELONGATION, ELONGATED_ELONGATION = 4.0, 2.0  # ratio of the moment ellipse's axes
ROUND_FILL = 0.8  # share of the moment ellipse a solid round region covers (a disc covers ~1.0)
CLUSTER_PARTS = 3  # this many separate parts or more: a cluster
# the short side of a region's box relative to its long side, per shape (for a horizontal or vertical one)
_SHORT_SIDE = {"thin": 0.12, "elongated": 0.4, "round": 1.0, "irregular": 0.85, "cluster": 0.9}


@dataclass(frozen=True)
class RegionWords:
    """The words of one region: each field is one vocabulary word (orientation ``None`` unless thin/elongated)."""

    kind: str
    size: str
    shape: str
    orientation: str | None
    cell: str
    extent: str


# ----------------------------------------------------------------------------------------------- properties
def _moments(ys: np.ndarray, xs: np.ndarray) -> tuple[float, float, float]:
    """(major axis variance, minor axis variance, major axis angle in degrees; x right, y down)."""
    cov = np.cov(np.stack([xs, ys]).astype(np.float64)) if len(xs) > 1 else np.zeros((2, 2))
    cov += np.eye(2) / 12.0  # each pixel is a unit square, not a point: a 1-px line still has a width
    values, vectors = np.linalg.eigh(cov)
    major = vectors[:, 1]
    angle = math.degrees(math.atan2(major[1], major[0])) % 180.0  # 0 horizontal, 45 diagonal (y down), 90 vertical
    return float(values[1]), float(values[0]), angle


def _orientation(angle: float) -> str:
    if angle < 22.5 or angle >= 157.5:
        return "horizontal"
    if 67.5 <= angle < 112.5:
        return "vertical"
    return "diagonal" if angle < 90 else "anti-diagonal"


def _nearest(table: tuple[tuple[str, float], ...], value: float) -> str:
    return min(table, key=lambda item: abs(math.log(item[1] / max(value, 1e-6))))[0]


def region_words(mask: np.ndarray, kind: str = "defect") -> RegionWords:
    """The vocabulary words of a non-empty (H, W) region: size, shape, orientation, grid cell, extent."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2 or not mask.any():
        raise PotpourriError(f"describe_mask needs a non-empty (H, W) mask, got shape {mask.shape} with no pixels")
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    area = len(xs) / mask.size
    size = next(word for word, limit in SIZES if area < limit)
    major, minor, angle = _moments(ys, xs)
    elongation = math.sqrt(major / minor)
    fill = len(xs) / (4 * math.pi * math.sqrt(major * minor))  # pixels over the moment ellipse's area
    parts = ndimage.label(mask, structure=np.ones((3, 3)))[1]
    if elongation >= THIN_ELONGATION:
        shape = "thin"
    elif parts >= CLUSTER_PARTS:
        shape = "cluster"
    elif elongation >= ELONGATED_ELONGATION:
        shape = "elongated"
    else:
        shape = "round" if fill >= ROUND_FILL and parts == 1 else "irregular"
    orientation = _orientation(angle) if shape in ("thin", "elongated") else None
    row = min(2, int(ys.mean() + 0.5) * 3 // height)
    col = min(2, int(xs.mean() + 0.5) * 3 // width)
    long_side = max((xs.max() - xs.min() + 1) / width, (ys.max() - ys.min() + 1) / height)
    return RegionWords(kind, size, shape, orientation, CELLS[3 * row + col], _nearest(EXTENTS, long_side))


def describe_mask(mask: np.ndarray, kind: str = "defect") -> str:
    """One sentence for a region: kind, size, position on a 3x3 grid, shape and (if elongated) orientation.

    Example:
        describe_mask(sample.mask == CLASSES.index("scratch"), "scratch")
    """
    words = region_words(mask, kind)
    article = "an" if words.size[0] in "aeiou" else "a"
    adjectives = " ".join(w for w in (words.size, words.shape, words.orientation) if w)
    return f"{article} {adjectives} {kind} in the {words.cell} of the image, about {words.extent} of the image across"


# ----------------------------------------------------------------------------------------------- parsing
@dataclass
class RegionPrior:
    """Where a sentence says a region is: a pixel box, an orientation and the words that were understood."""

    kind: str | None
    box: tuple[float, float, float, float]  # (x1, y1, x2, y2) pixels, textgeo's convention
    centre: tuple[float, float]  # (x, y) pixels
    long_side: float  # pixels
    shape: str
    orientation: str | None
    image_size: tuple[int, int]  # (width, height)
    words: dict[str, str]  # vocabulary field -> the word read

    def soft_map(self) -> np.ndarray:
        """An (H, W) float32 prior in [0, 1]: a Gaussian oriented along the region, 1 at its centre."""
        width, height = self.image_size
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        dx, dy = xx + 0.5 - self.centre[0], yy + 0.5 - self.centre[1]
        angle = {"horizontal": 0.0, "vertical": 90.0, "diagonal": 45.0, "anti-diagonal": 135.0}.get(
            self.orientation or "", 0.0
        )
        length = self.long_side * (math.sqrt(2) if angle in (45.0, 135.0) else 1.0)  # a box side -> along the line
        along = length / 4
        across = max(1.0, along * _SHORT_SIDE[self.shape]) if self.orientation else along
        theta = math.radians(angle)
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        return np.exp(-0.5 * ((u / along) ** 2 + (v / across) ** 2)).astype(np.float32)


def _find(words: tuple[str, ...], sentence: str) -> str | None:
    """The vocabulary word found in ``sentence`` (longest first, whole words), else None."""
    for word in sorted(words, key=len, reverse=True):
        if re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", sentence):
            return word
    return None


def parse_description(sentence: str, size: tuple[int, int] | int) -> RegionPrior:
    """A ``RegionPrior`` on an image of ``size`` ((width, height) or a side) from a sentence; words it cannot find
    fall back to the whole image's centre, a third of its side, an irregular shape. Never raises on text."""
    width, height = (size, size) if isinstance(size, int) else size
    text = (sentence if isinstance(sentence, str) else "").lower().replace("center", "centre")
    found: dict[str, str] = {}
    vocabularies = {"kind": KNOWN_KINDS, "size": tuple(w for w, _ in SIZES), "shape": SHAPES,
                    "orientation": ORIENTATIONS, "cell": CELLS, "extent": tuple(w for w, _ in EXTENTS)}  # fmt: skip
    for name, vocabulary in vocabularies.items():
        word = _find(vocabulary, text)
        if word is not None:
            found[name] = word
    if "cell" not in found and "middle" in text:
        found["cell"] = "centre"
    cell = CELLS.index(found.get("cell", "centre"))
    cx, cy = (cell % 3 + 0.5) / 3 * width, (cell // 3 + 0.5) / 3 * height
    side = min(width, height)
    long_side = dict(EXTENTS)[found.get("extent", "a third")] * side
    shape = found.get("shape", "irregular")
    orientation = found.get("orientation") if shape in ("thin", "elongated") else None
    if orientation in ("horizontal", "vertical"):
        short = long_side * _SHORT_SIDE[shape]
        w, h = (long_side, short) if orientation == "horizontal" else (short, long_side)
    elif orientation:  # a diagonal stroke's box is about square; thinner strokes leave its corners empty
        w = h = long_side
    else:
        w, h = long_side, long_side * _SHORT_SIDE[shape]
    box = (max(0.0, cx - w / 2), max(0.0, cy - h / 2), min(float(width), cx + w / 2), min(float(height), cy + h / 2))
    kind = found.get("kind")
    return RegionPrior(kind if kind != "defect" else None, box, (cx, cy), long_side, shape, orientation,
                       (width, height), found)  # fmt: skip
