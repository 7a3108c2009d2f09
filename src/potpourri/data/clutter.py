"""Object-in-clutter: a procedural classification set with exact object masks, for training small ViTs from scratch.

Each image holds one object (the label: one of 5 shapes in one of 2 colour families, 10 classes) on a smooth
random background among distractors (small blobs and strokes, in the same colours as the objects, so colour alone
does not give the class away). The object's pixel mask is exact, so token-level measurements (which tokens a model
"looks at") can be scored against ground truth. Same seed, same images.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from potpourri.core.errors import PotpourriError

__all__ = ["CLUTTER_CLASSES", "SHAPES", "make_clutter", "token_masks"]

SHAPES = ("disk", "square", "triangle", "cross", "ring")
# two colour families; each object draws a random member, distractors draw from both families
_FAMILIES = {
    "warm": ((220, 60, 40), (235, 150, 30), (200, 40, 120)),
    "cool": ((40, 90, 220), (30, 170, 160), (110, 60, 210)),
}
CLUTTER_CLASSES = tuple(f"{family}-{shape}" for family in _FAMILIES for shape in SHAPES)
_SS = 4  # supersampling factor for anti-aliased drawing


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: int | tuple) -> None:
    if shape == "disk":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    elif shape == "cross":
        w = 0.35 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # ring
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        inner = 0.5 * r
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=0 if isinstance(fill, int) else None)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    noise = gaussian_filter(rng.normal(size=(size, size, 3)), sigma=(size / 6, size / 6, 0))
    noise = (noise - noise.mean()) / (noise.std() + 1e-8)
    base = rng.uniform(90, 150)
    return np.clip(base + 25 * noise, 0, 255)  # (S, S, 3) float


def _one(size: int, label: int, rng: np.random.Generator, distractors: int) -> tuple[np.ndarray, np.ndarray]:
    family, shape = divmod(label, len(SHAPES))
    big = size * _SS
    canvas = _background(size, rng)
    layer = Image.new("RGB", (big, big))
    alpha = Image.new("L", (big, big))
    colours = [c for fam in _FAMILIES.values() for c in fam]
    for _ in range(distractors):  # small blobs and strokes in object colours, drawn first (the object is on top)
        colour = colours[rng.integers(len(colours))]
        x, y = rng.uniform(0, big, size=2)
        d_layer, d_alpha = ImageDraw.Draw(layer), ImageDraw.Draw(alpha)
        if rng.random() < 0.5:
            r = rng.uniform(0.03, 0.07) * big
            for d, fill in ((d_layer, colour), (d_alpha, 255)):
                d.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        else:
            dx, dy = rng.uniform(-0.25, 0.25, size=2) * big
            for d, fill in ((d_layer, colour), (d_alpha, 255)):
                d.line([x, y, x + dx, y + dy], fill=fill, width=max(1, int(0.03 * big)))
    r = rng.uniform(0.2, 0.28) * big
    cx, cy = rng.uniform(r, big - r, size=2)
    colour = tuple(
        int(v)
        for v in np.clip(
            np.array(list(_FAMILIES.values())[family][rng.integers(3)]) + rng.integers(-20, 21, size=3), 0, 255
        )
    )
    obj = Image.new("L", (big, big))
    _draw_shape(ImageDraw.Draw(obj), SHAPES[shape], cx, cy, r, 255)
    layer.paste(Image.new("RGB", (big, big), colour), mask=obj)
    alpha.paste(255, mask=obj)
    layer_small = np.asarray(layer.resize((size, size), Image.BOX), dtype=np.float64)
    alpha_small = np.asarray(alpha.resize((size, size), Image.BOX), dtype=np.float64)[..., None] / 255.0
    mask = np.asarray(obj.resize((size, size), Image.BOX)) >= 128  # (S, S) bool
    image = canvas * (1 - alpha_small) + layer_small  # the box-filtered layer is already alpha-premultiplied
    return np.clip(image + rng.normal(0, 4, size=image.shape), 0, 255).astype(np.uint8), mask


def make_clutter(
    n: int, *, size: int = 32, seed: int = 0, distractors: int = 6
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` balanced images: uint8 ``(n, size, size, 3)``, labels ``(n,)`` in 0..9, object masks ``(n, size, size)``.

    Example:
        images, labels, masks = make_clutter(1000, size=32, seed=0)
    """
    if n < 1 or size < 16:
        raise PotpourriError(f"make_clutter needs n >= 1 and size >= 16 (got n={n}, size={size})")
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLUTTER_CLASSES)
    rng.shuffle(labels)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), bool)
    for i, label in enumerate(labels):
        images[i], masks[i] = _one(size, int(label), rng, distractors)
    return images, labels.astype(np.int64), masks


def token_masks(masks: np.ndarray, patch: int, *, min_fraction: float = 0.25) -> np.ndarray:
    """Pixel masks ``(n, H, W)`` → token masks ``(n, H/patch · W/patch)``: a token is "object" if it is covered
    by at least ``min_fraction`` of object pixels (the paper projects its masks onto the token grid the same way)."""
    n, h, w = masks.shape
    if h % patch or w % patch:
        raise PotpourriError(f"mask size {h}x{w} is not a multiple of the patch size {patch}")
    cover = masks.reshape(n, h // patch, patch, w // patch, patch).mean(axis=(2, 4))
    return (cover >= min_fraction).reshape(n, -1)
