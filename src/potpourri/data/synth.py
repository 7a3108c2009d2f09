"""DS-Synth: seeded, procedural multi-class defects on crops of real texture photos from scikit-image.

Each photo is one *category* (``brick``, ``grass``, ``gravel``, ``moon``, ``tissue``). Train crops come from the
top 62.5 % of the photo's rows and test crops from the rest, so no test pixel is ever seen in training. Six
defect classes are drawn procedurally (ids 1-6, 0 = good): scratch, crack, stain, hole, contamination, dent.
Pixels outside a sample's mask are byte-identical to its clean crop.

In-memory API (no files; what the demo and the tuning engine use)::

    from potpourri.data.synth import make_samples, make_task
    samples = make_samples("brick", "test", 14, seed=0, size=128)   # list[SynthSample], kinds cycle good..dent
    s = samples[3]; s.image, s.mask, s.label, s.caption              # (H, W, 3) uint8, (H, W) uint8, int, str
    task = make_task("classification", n_per_class=10, size=128)     # also "anomaly", "segmentation"
    task.train_images.shape, task.train_labels, task.class_names     # (N, H, W, 3) uint8, (N,) int64, list[str]

Writing the benchmark to disk (both layouts, captions, manifest)::

    from potpourri.data.synth import write_ds_synth
    manifest = write_ds_synth("/tmp/ds", seed=0, size=256, per_class=20)

Length: one generator — the seven defect painters share the texture, mask and severity code, and splitting them
would scatter one seeded recipe.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from potpourri.core.errors import PotpourriError
from potpourri.data.synth_shapes import SHAPE_PAINTERS, apply_ink, draw_ink, rasterise

__all__ = [
    "BENCHMARK_V2",
    "CATEGORIES",
    "CLASSES",
    "GENERATOR_VERSION",
    "PALETTE",
    "SPLIT_FRACTION",
    "VERSIONS",
    "SynthSample",
    "SynthTask",
    "check_version",
    "location_phrase",
    "make_sample",
    "make_samples",
    "make_task",
    "photo",
    "split_rows",
    "write_ds_synth",
]

GENERATOR_VERSION = "1.0"  # of dataset version "1"; bump when v1's bytes change
VERSIONS = {"1": "1.0", "2": "2.0"}  # dataset version -> generator version (v2: shape-only defect types)
# The pinned v2 defect-type classification benchmark (issue 20): per surface and class, images at the model's size.
# Measured at 128 px: Lite0 probe 0.605 vs colour histogram 0.221 (benchmarks/ds_synth_probe_sweep.py --version 2).
BENCHMARK_V2 = {"version": "2", "n_per_class": 20, "severity": 0.75}
CLASSES = ("good", "scratch", "crack", "stain", "hole", "contamination", "dent")
DEFECTS = CLASSES[1:]
MULTI = "multi"  # a test image with 2-3 defects of different classes
# Defect Spectrum's 11-colour palette for indices 0-10 (Defect-Gen convert_to_color.py order).
PALETTE = (
    (0, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 0), (255, 255, 0), (255, 0, 255),
    (0, 255, 255), (128, 0, 0), (0, 128, 0), (0, 0, 128), (128, 128, 128),
)  # fmt: skip
SPLIT_FRACTION = 0.625  # rows [0, 62.5 %) of a photo feed train crops, the rest feed test crops
SPLITS = ("train", "test")
# skimage photo name and an RGB tint (the texture photos are grey; a tint makes colour statistics meaningful).
CATEGORIES: dict[str, tuple[str, tuple[float, float, float]]] = {
    "brick": ("brick", (1.0, 0.82, 0.72)),
    "grass": ("grass", (0.78, 1.0, 0.66)),
    "gravel": ("gravel", (0.96, 0.94, 0.88)),
    "moon": ("moon", (0.9, 0.92, 1.0)),  # a cast-metal-like pitted surface
    "tissue": ("immunohistochemistry", (1.0, 1.0, 1.0)),  # a fabric-like stained texture, already RGB
}
_LOCATIONS = (
    ("upper left", "top", "upper right"),
    ("left", "center", "right"),
    ("lower left", "bottom", "lower right"),
)


def check_version(version: str) -> None:
    """One-line error for an unknown DS-Synth version."""
    if version not in VERSIONS:
        raise PotpourriError(f"unknown DS-Synth version '{version}'; choose from {', '.join(VERSIONS)}")


# ----------------------------------------------------------------------------------------------- base photos
@cache
def photo(category: str) -> np.ndarray:
    """The tinted source photo of a category, (H, W, 3) uint8 (read-only)."""
    if category not in CATEGORIES:
        raise PotpourriError(f"unknown DS-Synth category '{category}'; choose from {', '.join(CATEGORIES)}")
    import skimage.data

    name, tint = CATEGORIES[category]
    pixels = getattr(skimage.data, name)()
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    tinted = np.clip(pixels[..., :3].astype(np.float32) * np.asarray(tint, np.float32), 0, 255).round()
    out = tinted.astype(np.uint8)
    out.flags.writeable = False
    return out


def split_rows(category: str, split: str) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the category's photo that crops of ``split`` may come from."""
    if split not in SPLITS:
        raise PotpourriError(f"unknown split '{split}'; choose 'train' or 'test'")
    height = photo(category).shape[0]
    cut = int(height * SPLIT_FRACTION)
    return (0, cut) if split == "train" else (cut, height)


def _crop_side(category: str) -> int:
    height, width = photo(category).shape[:2]
    return min(int(min(height, width) * 0.3125), height - int(height * SPLIT_FRACTION), width)


# ----------------------------------------------------------------------------------------------- defects
@dataclass(frozen=True)
class Defect:
    """One drawn defect: its class, where it is, and the words of its caption."""

    name: str
    center: tuple[float, float]  # (y, x) in pixels
    phrase: str


def _bezier(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, steps: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 1.0, steps)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # (steps, 2) as (x, y)


def _length_word(length: float, size: int) -> str:
    return "short" if length < 0.3 * size else "long"


def _area_word(alpha: np.ndarray) -> str:
    frac = float((alpha > 0.02).mean())
    return "small" if frac < 0.006 else ("large" if frac > 0.025 else "medium-sized")


def _scratch(img: np.ndarray, rng: np.random.Generator, sev: float, center: np.ndarray):
    size = img.shape[0]
    length = rng.uniform(0.2, 0.45) * size * (0.6 + 0.8 * sev)
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    p0, p2 = center - direction * length / 2, center + direction * length / 2
    p1 = center + np.array([-direction[1], direction[0]]) * rng.uniform(-0.3, 0.3) * length
    points = _bezier(p0, p1, p2)
    width = rng.uniform(1.0, 2.2) * size / 256

    def draw(d: ImageDraw.ImageDraw, s: int) -> None:
        d.line([tuple(p) for p in points * s], fill=255, width=max(1, round(width * s)), joint="curve")

    alpha = rasterise(size, draw)
    strength = min(0.9, 0.25 + 0.9 * sev) * rng.uniform(0.7, 1.0)
    dark = bool(rng.random() < 0.5)
    target = img * (1 - strength) if dark else img + (1 - img) * strength
    out = img * (1 - alpha[..., None]) + target * alpha[..., None]
    phrase = f"a {_length_word(length, size)} {'dark' if dark else 'light'} scratch"
    return out, alpha, phrase


def _crack(img: np.ndarray, rng: np.random.Generator, sev: float, center: np.ndarray):
    size = img.shape[0]
    step = 2.0 * size / 256
    total = rng.uniform(0.2, 0.4) * size * (0.6 + 0.8 * sev)
    walks, stack = [], [(center.copy(), rng.uniform(0, 2 * np.pi), total)]
    while stack and len(walks) < 6:
        pos, heading, budget = stack.pop()
        path = [pos.copy()]
        for _ in range(int(budget / step)):
            heading += rng.normal(0, 0.35)
            pos = pos + step * np.array([np.cos(heading), np.sin(heading)])
            path.append(pos.copy())
            if rng.random() < 0.03:  # a branch leaves at a sharp angle with a shorter budget
                stack.append((pos.copy(), heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1), budget * 0.4))
        walks.append(np.array(path))
    width = rng.uniform(1.0, 1.8) * size / 256

    def draw(d: ImageDraw.ImageDraw, s: int) -> None:
        for path in walks:
            d.line([tuple(p) for p in path * s], fill=255, width=max(1, round(width * s)), joint="curve")

    core = rasterise(size, draw)
    # shading: the crack's lower-right lip catches light, so a 1-px-shifted copy brightens outside the core
    lip = np.clip(np.roll(core, (1, 1), axis=(0, 1)) - core, 0, 1) * 0.7
    strength = min(0.95, 0.35 + 0.9 * sev)
    out = img * (1 - strength * core[..., None])
    out = out + (1 - out) * (0.5 * strength * lip[..., None])
    alpha = np.maximum(core, lip)
    phrase = f"a {'branching ' if len(walks) > 1 else ''}{_length_word(total, size)} crack"
    return out, alpha, phrase


_STAIN_TINTS = {"brownish": (0.78, 0.6, 0.4), "yellowish": (1.15, 1.05, 0.55), "dark grey": (0.55, 0.55, 0.58),
                "bluish": (0.7, 0.8, 1.15), "reddish": (1.15, 0.7, 0.65)}  # fmt: skip


def _stain(img: np.ndarray, rng: np.random.Generator, sev: float, center: np.ndarray):
    size = img.shape[0]
    radius = rng.uniform(0.05, 0.1) * size * (0.6 + 0.8 * sev)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.5, 1.0)
    dx, dy = xx - center[0], yy - center[1]
    u, v = dx * np.cos(angle) + dy * np.sin(angle), (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    envelope = np.exp(-(u**2 + v**2) / (2 * radius**2))
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma=radius / 3)
    noise /= noise.std() + 1e-6
    field_ = envelope * (1 + 0.35 * noise)
    alpha = np.clip((field_ - 0.3) / 0.35, 0, 1)
    alpha = alpha * alpha * (3 - 2 * alpha) * min(1.0, 0.35 + 0.8 * sev)  # smoothstep edge, partial opacity
    tint_name = str(rng.choice(list(_STAIN_TINTS)))
    target = np.clip(img * np.asarray(_STAIN_TINTS[tint_name], np.float32), 0, 1)
    out = img * (1 - alpha[..., None]) + target * alpha[..., None]
    return out, alpha, f"a {_area_word(alpha)} {tint_name} stain"


def _hole(img: np.ndarray, rng: np.random.Generator, sev: float, center: np.ndarray):
    size = img.shape[0]
    radius = rng.uniform(0.03, 0.065) * size * (0.6 + 0.8 * sev)
    aspect, angle = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - center[0], yy - center[1]
    u, v = dx * np.cos(angle) + dy * np.sin(angle), (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    r = np.sqrt(u**2 + v**2) / radius  # 1.0 at the hole's edge
    inside = np.clip((1.0 - r) * radius, 0, 1)  # 1-px soft edge
    rim = np.clip(1 - np.abs(r - 1.12) / 0.14, 0, 1) * (r > 0.9)
    light = np.array([np.cos(a := rng.uniform(0, 2 * np.pi)), np.sin(a)])
    facing = (dx * light[0] + dy * light[1]) / (np.sqrt(dx**2 + dy**2) + 1e-6)  # -1..1 across the hole
    depth = 0.08 + 0.12 * (1 + facing) / 2  # inner shading: the wall facing the light is brighter
    hole = img.mean(axis=2, keepdims=True) * 0.25 + depth[..., None]
    rim_tone = 1 + 0.35 * min(1.0, 0.3 + sev) * facing[..., None]  # the lit side of the rim is raised
    out = img * (1 - rim[..., None]) + img * rim_tone * rim[..., None]
    strength = min(1.0, 0.5 + 0.7 * sev)
    out = out * (1 - inside[..., None] * strength) + hole * inside[..., None] * strength
    alpha = np.maximum(inside, rim)
    return out, alpha, f"a {_area_word(alpha)} hole"


def _contamination(img: np.ndarray, rng: np.random.Generator, sev: float, center: np.ndarray):
    size = img.shape[0]
    count = int(rng.integers(6, 16 + int(20 * sev)))
    spread = rng.uniform(0.025, 0.05) * size * (0.6 + 0.8 * sev)
    offsets = rng.normal(0, spread, size=(count, 2))
    radii = rng.uniform(0.7, 2.2, size=count) * size / 256 * (0.7 + 0.6 * sev)
    shades = rng.integers(140, 256, size=count)

    def draw(d: ImageDraw.ImageDraw, s: int) -> None:
        for (ox, oy), rad, shade in zip(offsets, radii, shades, strict=True):
            x, y = (center[0] + ox) * s, (center[1] + oy) * s
            d.ellipse([x - rad * s, y - rad * s, x + rad * s, y + rad * s], fill=int(shade))

    alpha = rasterise(size, draw)
    dark = bool(rng.random() < 0.6)
    colour = rng.uniform(0.0, 0.15, 3) if dark else rng.uniform(0.3, 0.9, 3)
    opacity = min(1.0, 0.45 + 0.8 * sev)
    out = img * (1 - alpha[..., None] * opacity) + colour.astype(np.float32) * alpha[..., None] * opacity
    tone = "dark" if dark else "coloured"
    return out, alpha, f"a {'dense' if count > 20 else 'loose'} cluster of {tone} contamination specks"


def _dent(img: np.ndarray, rng: np.random.Generator, sev: float, center: np.ndarray):
    size = img.shape[0]
    radius = rng.uniform(0.06, 0.11) * size * (0.6 + 0.8 * sev)
    sigma = radius / 2.5
    y0, y1 = max(0, int(center[1] - radius) - 1), min(size, int(center[1] + radius) + 2)
    x0, x1 = max(0, int(center[0] - radius) - 1), min(size, int(center[0] + radius) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - center[0], yy - center[1]
    r2 = dx**2 + dy**2
    height = np.exp(-r2 / (2 * sigma**2))
    pull = (1.5 + 5.0 * sev) * size / 256 / sigma  # pixels sample from further out: the surface is pinched in
    src_y, src_x = yy + dy * pull * height, xx + dx * pull * height
    out = img.copy()
    for c in range(3):
        out[y0:y1, x0:x1, c] = ndimage.map_coordinates(img[..., c], [src_y, src_x], order=1, mode="reflect")
    angle = rng.uniform(0, 2 * np.pi)
    slope = -(dx * np.cos(angle) + dy * np.sin(angle)) / sigma * height  # lambertian-ish shading of the bowl
    out[y0:y1, x0:x1] *= (1 + (0.25 + 0.5 * sev) * slope)[..., None]
    alpha = np.zeros((size, size), np.float32)
    alpha[y0:y1, x0:x1] = (r2 < radius**2).astype(np.float32)
    out = np.where(alpha[..., None] > 0, out, img)
    return out, alpha, f"a {_area_word(alpha)} dent"


_RENDERERS = {
    "scratch": _scratch,
    "crack": _crack,
    "stain": _stain,
    "hole": _hole,
    "contamination": _contamination,
    "dent": _dent,
}
_MASK_THRESHOLD = 0.02  # alpha above this is the defect; below, the clean pixel is kept byte for byte


# ----------------------------------------------------------------------------------------------- samples
@dataclass
class SynthSample:
    """One DS-Synth image with its exact ground truth."""

    image: np.ndarray  # (H, W, 3) uint8, defects drawn in
    clean: np.ndarray  # (H, W, 3) uint8, the same crop without defects
    mask: np.ndarray  # (H, W) uint8 class index (0 good, k = CLASSES[k])
    kind: str  # "good", a defect class, or "multi"
    label: int  # CLASSES index of the kind; len(CLASSES) for "multi"
    defects: tuple[Defect, ...]
    caption: str
    category: str
    split: str
    index: int  # index within (category, split, kind)
    crop_box: tuple[int, int, int, int]  # (y0, x0, y1, x1) in the source photo
    transform: tuple[int, bool] = field(default=(0, False))  # (quarter turns, horizontal flip) applied to the crop

    @property
    def defect_classes(self) -> tuple[str, ...]:
        return tuple(sorted({d.name for d in self.defects}, key=CLASSES.index))


def _sample_rng(seed: int, category: str, split: str, kind: str, index: int) -> np.random.Generator:
    kinds = (*CLASSES, MULTI)
    key = [seed, list(CATEGORIES).index(category), SPLITS.index(split), kinds.index(kind), index]
    return np.random.default_rng(np.random.SeedSequence(key))


def _clean_crop(category: str, split: str, size: int, rng: np.random.Generator):
    source = photo(category)
    row0, row1 = split_rows(category, split)
    side = _crop_side(category)
    y0 = int(rng.integers(row0, row1 - side + 1))
    x0 = int(rng.integers(0, source.shape[1] - side + 1))
    crop = source[y0 : y0 + side, x0 : x0 + side]
    turns, flip = int(rng.integers(0, 4)), bool(rng.random() < 0.5)
    crop = np.rot90(crop, turns)
    if flip:
        crop = crop[:, ::-1]
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BICUBIC)
    gain = rng.uniform(0.92, 1.08) * rng.uniform(0.96, 1.04, 3)  # brightness and per-channel colour jitter
    clean = np.clip(np.asarray(resized, np.float32) * gain.astype(np.float32), 0, 255).round().astype(np.uint8)
    return clean, (y0, x0, y0 + side, x0 + side), (turns, flip)


def location_phrase(center: tuple[float, float], size: int) -> str:
    """Where a point lies on a ``size`` px image, as caption words (a 3x3 grid): "in the top left", "on the right"."""
    row, col = min(2, int(center[0] / size * 3)), min(2, int(center[1] / size * 3))
    where = _LOCATIONS[row][col]
    preposition = {"center": "in the", "top": "at the", "bottom": "at the", "left": "on the", "right": "on the"}
    return f"{preposition.get(where, 'in the')} {where}"


def _paint_v2(canvas: np.ndarray, rng: np.random.Generator, name: str, severity: float, xy: np.ndarray):
    """v2: the type's shape in a class-independent ink (see ``synth_shapes``); (rendered, alpha, phrase)."""
    alpha, shape_words = SHAPE_PAINTERS[name](canvas.shape[0], rng, xy)
    ink = draw_ink(rng, severity)
    dark, _, tint = ink
    tone = ("darker" if dark else "lighter") + ("" if tint == "neutral" else f", {tint}")
    return apply_ink(canvas, alpha, ink), alpha, f"{shape_words} ({tone})"


def make_sample(
    category: str,
    split: str,
    kind: str,
    index: int,
    *,
    seed: int = 0,
    size: int = 256,
    severity: float = 0.5,
    version: str = "1",
) -> SynthSample:
    """One deterministic sample: ``kind`` is "good", a defect class or "multi"; same arguments, same bytes.

    ``version`` "1" (the default, what every run before the v2 benchmark used) or "2" (class-independent ink,
    types differ by shape only; see ``synth_shapes``).
    """
    check_version(version)
    if kind not in (*CLASSES, MULTI):
        raise PotpourriError(f"unknown DS-Synth kind '{kind}'; choose from {', '.join((*CLASSES, MULTI))}")
    if not 0.0 <= severity <= 1.0:
        raise PotpourriError(f"severity {severity} is outside [0, 1]; 0.5 is the default benchmark")
    if size < 32:
        raise PotpourriError(f"size {size} is too small for DS-Synth; use 32 px or more")
    photo(category)  # unknown category: one-line error listing the known ones
    rng = _sample_rng(seed, category, split, kind, index)
    clean, box, transform = _clean_crop(category, split, size, rng)
    if kind == "good":
        names: list[str] = []
    elif kind == MULTI:
        names = [str(n) for n in rng.choice(DEFECTS, size=int(rng.integers(2, 4)), replace=False)]
    else:
        names = [kind]
    # distinct cells of a 3x3 grid so that defects of a multi image rarely cover each other
    cells = rng.choice(9, size=len(names), replace=False)
    canvas = clean.astype(np.float32) / 255.0
    image = clean.copy()
    mask = np.zeros((size, size), np.uint8)
    drawn = []
    for name, cell in zip(names, cells, strict=True):
        cy, cx = divmod(int(cell), 3) if kind == MULTI else (1, 1)
        spread = 0.22 if kind == MULTI else 0.55
        xy = np.array([(cx + 0.5) / 3, (cy + 0.5) / 3]) * size + rng.uniform(-spread, spread, 2) * size / 3
        xy = np.clip(xy, 0.15 * size, 0.85 * size)
        if version == "1":
            rendered, alpha, phrase = _RENDERERS[name](canvas, rng, severity, xy)
        else:
            rendered, alpha, phrase = _paint_v2(canvas, rng, name, severity, xy)
        region = alpha > _MASK_THRESHOLD
        image[region] = np.clip(rendered[region] * 255.0, 0, 255).round().astype(np.uint8)
        mask[region] = CLASSES.index(name)
        canvas = image.astype(np.float32) / 255.0
        ys, xs = np.nonzero(region)  # the caption places the defect where its pixels are, not where it was aimed
        drawn.append((name, (float(ys.mean()), float(xs.mean())) if len(ys) else (float(xy[1]), float(xy[0])), phrase))
    defects = tuple(
        Defect(name=n, center=c, phrase=f"{p} {location_phrase(c, size)}")
        for n, c, p in drawn
        if (mask == CLASSES.index(n)).any()  # a later defect may hide an earlier one; captions name visible ones
    )
    surface = f"a {category} surface"
    phrases = " and ".join(d.phrase for d in defects)
    caption = f"{surface} with {phrases}" if defects else f"{surface} with no defect"
    label = len(CLASSES) if kind == MULTI else CLASSES.index(kind)
    return SynthSample(image, clean, mask, kind, label, defects, caption, category, split, index, box, transform)


def make_samples(
    category: str,
    split: str,
    n: int,
    *,
    seed: int = 0,
    size: int = 256,
    kinds: Sequence[str] | None = None,
    severity: float = 0.5,
    version: str = "1",
) -> list[SynthSample]:
    """``n`` samples whose kinds cycle through ``kinds`` (default: good and the six defect classes).

    Example:
        >>> [s.kind for s in make_samples("brick", "train", 3, size=64)]
        ['good', 'scratch', 'crack']
    """
    kinds = tuple(kinds) if kinds is not None else CLASSES
    if not kinds:
        raise PotpourriError("kinds is empty; pass e.g. ('good',) or leave it out for all classes")
    return [
        make_sample(
            category,
            split,
            kinds[i % len(kinds)],
            i // len(kinds),
            seed=seed,
            size=size,
            severity=severity,
            version=version,
        )
        for i in range(n)
    ]


# ----------------------------------------------------------------------------------------------- tasks
@dataclass
class SynthTask:
    """Arrays for one of the three DS-Synth tasks; masks are class-index (segmentation) or 0/1 (anomaly)."""

    name: str
    class_names: list[str]
    train_images: np.ndarray  # (N, H, W, 3) uint8
    train_labels: np.ndarray  # (N,) int64
    train_masks: np.ndarray  # (N, H, W) uint8
    test_images: np.ndarray
    test_labels: np.ndarray
    test_masks: np.ndarray
    test_categories: list[str] = field(default_factory=list)


def _stack(samples: list[SynthSample], label_fn, mask_fn):
    images = np.stack([s.image for s in samples])
    labels = np.array([label_fn(s) for s in samples], dtype=np.int64)
    masks = np.stack([mask_fn(s) for s in samples])
    return images, labels, masks


def make_task(
    task: str,
    *,
    categories: Sequence[str] = ("brick", "grass", "gravel"),
    n_per_class: int = 10,
    seed: int = 0,
    size: int = 128,
    severity: float = 0.5,
    version: str = "1",
) -> SynthTask:
    """Build a task: "classification" (good + 6 defect types), "anomaly" (good-only train), "segmentation".

    Example:
        >>> task = make_task("anomaly", categories=("brick",), n_per_class=2, size=64)
        >>> task.class_names, int(task.train_labels.sum())
        (['good', 'defect'], 0)
    """
    gen = {"seed": seed, "size": size, "severity": severity, "version": version}
    train: list[SynthSample] = []
    test: list[SynthSample] = []
    if task == "classification":
        for cat in categories:
            train += make_samples(cat, "train", n_per_class * len(CLASSES), **gen)
            test += make_samples(cat, "test", n_per_class * len(CLASSES), **gen)
        xs, ys, ms = _stack(train, lambda s: s.label, lambda s: s.mask)
        xt, yt, mt = _stack(test, lambda s: s.label, lambda s: s.mask)
        names = list(CLASSES)
    elif task == "anomaly":
        kinds = (*CLASSES, MULTI)
        for cat in categories:
            train += make_samples(cat, "train", n_per_class * len(kinds), kinds=("good",), **gen)
            test += make_samples(cat, "test", n_per_class * len(kinds), kinds=kinds, **gen)
        binary_mask = lambda s: (s.mask > 0).astype(np.uint8)  # noqa: E731
        xs, ys, ms = _stack(train, lambda s: int(s.kind != "good"), binary_mask)
        xt, yt, mt = _stack(test, lambda s: int(s.kind != "good"), binary_mask)
        names = ["good", "defect"]
    elif task == "segmentation":
        kinds = (*DEFECTS, MULTI)
        for cat in categories:
            train += make_samples(cat, "train", n_per_class * len(kinds), kinds=kinds, **gen)
            test += make_samples(cat, "test", n_per_class * len(kinds), kinds=kinds, **gen)
        xs, ys, ms = _stack(train, lambda s: s.label, lambda s: s.mask)
        xt, yt, mt = _stack(test, lambda s: s.label, lambda s: s.mask)
        names = list(CLASSES)
    else:
        raise PotpourriError(f"unknown DS-Synth task '{task}'; choose classification, anomaly or segmentation")
    return SynthTask(task, names, xs, ys, ms, xt, yt, mt, [s.category for s in test])


# ----------------------------------------------------------------------------------------------- files
def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _job_files(job: tuple[str, str, str, int, int, int, float, str]) -> tuple[dict[str, bytes], dict[str, Any]]:
    category, split, kind, index, seed, size, severity, version = job
    s = make_sample(category, split, kind, index, seed=seed, size=size, severity=severity, version=version)
    stem = f"{index:03d}"
    image_png = _png(s.image)
    files = {}
    record: dict[str, Any] = {"category": category, "split": split, "kind": kind, "caption": s.caption,
                              "classes": list(s.defect_classes),
                              "defects": [{"class": d.name, "center_yx": [round(v, 1) for v in d.center],
                                           "phrase": d.phrase} for d in s.defects]}  # fmt: skip
    mv = f"MVTec-Synth/{category}"
    if split == "train":
        files[f"{mv}/train/good/{stem}.png"] = image_png
        record["mvtec_image"] = f"{mv}/train/good/{stem}.png"
        return files, record
    files[f"{mv}/test/{kind}/{stem}.png"] = image_png
    record["mvtec_image"] = f"{mv}/test/{kind}/{stem}.png"
    if kind != "good":
        files[f"{mv}/ground_truth/{kind}/{stem}_mask.png"] = _png(((s.mask > 0) * 255).astype(np.uint8))
        ds = f"DS-Synth/{category}"
        rgb = np.asarray(PALETTE, np.uint8)[s.mask]
        files[f"{ds}/image/{kind}/{stem}.png"] = image_png
        files[f"{ds}/mask/{kind}/{stem}_mask.png"] = _png(s.mask)
        files[f"{ds}/rbg_mask/{kind}/{stem}_rbg_mask.png"] = _png(rgb)
        record["ds_image"] = f"{ds}/image/{kind}/{stem}.png"
        record["ds_mask"] = f"{ds}/mask/{kind}/{stem}_mask.png"
    return files, record


def _class_table() -> list[dict[str, Any]]:
    return [{"id": i, "name": n, "color": list(PALETTE[i])} for i, n in enumerate(CLASSES)]


def write_ds_synth(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    size: int = 256,
    per_class: int = 20,
    categories: Sequence[str] | None = None,
    severity: float = 0.5,
    workers: int | None = None,
    version: str = "1",
) -> dict[str, Any]:
    """Write DS-Synth in the Defect Spectrum and MVTec AD layouts plus captions and manifest; returns the manifest.

    Per category: ``per_class`` test images per defect class and of "multi", ``per_class`` good test images and
    ``2 * per_class`` good train images.
    """
    check_version(version)
    categories = list(categories or CATEGORIES)
    for cat in categories:
        photo(cat)  # fail early on an unknown category
    if per_class < 1:
        raise PotpourriError(f"per_class must be at least 1, got {per_class}")
    root = Path(out)
    jobs = []
    for cat in categories:
        jobs += [(cat, "train", "good", i, seed, size, severity, version) for i in range(2 * per_class)]
        for kind in (*CLASSES, MULTI):
            jobs += [(cat, "test", kind, i, seed, size, severity, version) for i in range(per_class)]
    workers = workers if workers is not None else min(len(os.sched_getaffinity(0)), 8)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_job_files, jobs, chunksize=8))
    else:
        results = [_job_files(job) for job in jobs]
    hashes: dict[str, str] = {}
    captions = []
    for files, record in results:
        for rel, data in files.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            hashes[rel] = hashlib.sha256(data).hexdigest()
        captions.append(record)
    classes_json = json.dumps({"classes": _class_table(), "multi": MULTI}, indent=2, sort_keys=True).encode()
    captions_jsonl = "".join(json.dumps(r, sort_keys=True) + "\n" for r in captions).encode()
    for rel, data in (("classes.json", classes_json), ("captions.jsonl", captions_jsonl)):
        (root / rel).write_bytes(data)
        hashes[rel] = hashlib.sha256(data).hexdigest()
    for cat in categories:  # the DS layout's class table lives next to each category, as DS-MVTec.md does
        rel = f"DS-Synth/{cat}/classes.json"
        (root / rel).write_bytes(classes_json)
        hashes[rel] = hashlib.sha256(classes_json).hexdigest()
    counts: dict[str, dict[str, int]] = {}
    for record in captions:
        key = f"{record['split']}/{record['kind']}"
        counts.setdefault(record["category"], {}).setdefault(key, 0)
        counts[record["category"]][key] += 1
    manifest = {
        "name": "DS-Synth",
        "generator_version": VERSIONS[version],
        "dataset_version": version,
        "seed": seed,
        "size": size,
        "per_class": per_class,
        "severity": severity,
        "categories": {
            c: {"photo": f"skimage.data.{CATEGORIES[c][0]}", "rows": {s: split_rows(c, s) for s in SPLITS}}
            for c in categories
        },
        "classes": _class_table(),
        "counts": counts,
        "files": dict(sorted(hashes.items())),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
