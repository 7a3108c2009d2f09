"""DS-Synth v2 defect painters: one class-independent ink, six shapes.

In DS-Synth v1 each defect type has its own look (stains are tinted, holes dark, contamination dark or coloured
specks), so a colour histogram tells the types apart about as well as ImageNet features do
(``benchmarks/ds_synth_probe_sweep.py``). In v2 every defect draws its *ink* (darker or lighter, how strongly, an
optional tint) from one distribution shared by all six types, and the types cover similar areas of the image; what
separates them is shape alone:

* scratch: one to three long, nearly straight parallel strokes;
* crack: a jagged random walk that branches;
* stain: a soft-edged irregular blob;
* hole: a crisp-edged round disc;
* contamination: a cluster of small specks;
* dent: a crescent of shading on one side of a round bowl.

Each painter returns ``(alpha, phrase)``: the defect's coverage in [0, 1], (size, size) float32, and its caption
words; :func:`apply_ink` turns coverage into pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = ["INK_TINTS", "SHAPE_PAINTERS", "apply_ink", "draw_ink", "rasterise"]

# multiplicative tints shared by every defect type (half of the defects are neutral)
INK_TINTS = {"neutral": (1.0, 1.0, 1.0), "brownish": (0.95, 0.8, 0.62), "bluish": (0.8, 0.9, 1.1),
             "reddish": (1.1, 0.82, 0.78), "greenish": (0.85, 1.05, 0.82)}  # fmt: skip


def rasterise(size: int, draw_fn: Callable[[ImageDraw.ImageDraw, int], None], supersample: int = 2) -> np.ndarray:
    """Rasterise ``draw_fn(draw, scale)`` anti-aliased at 2x and box-downsample; (size, size) float32 in [0, 1]."""
    canvas = Image.new("L", (size * supersample, size * supersample), 0)
    draw_fn(ImageDraw.Draw(canvas), supersample)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


def _grid(size: int, center: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return xx - center[0], yy - center[1]


def _scratch(size: int, rng: np.random.Generator, center: np.ndarray) -> tuple[np.ndarray, str]:
    strokes = int(rng.integers(1, 4))
    length = rng.uniform(0.45, 0.7) * size
    width = rng.uniform(0.018, 0.028) * size
    angle = rng.uniform(0, np.pi)
    along, across = np.array([np.cos(angle), np.sin(angle)]), np.array([-np.sin(angle), np.cos(angle)])
    bend = rng.uniform(-0.08, 0.08) * length  # nearly straight: a tool dragged across the surface
    offsets = (np.arange(strokes) - (strokes - 1) / 2) * rng.uniform(2.2, 3.5) * width

    def draw(d: ImageDraw.ImageDraw, s: int) -> None:
        t = np.linspace(-0.5, 0.5, 32)[:, None]
        for offset, shift in zip(offsets, rng.uniform(-0.1, 0.1, strokes) * length, strict=True):
            points = center + (t * length + shift) * along + (offset + bend * (1 - 4 * t**2)) * across
            d.line([tuple(p) for p in points * s], fill=255, width=max(1, round(width * s)), joint="curve")

    words = {1: "a long scratch", 2: "two parallel scratches", 3: "three parallel scratches"}
    return rasterise(size, draw), words[strokes]


def _crack(size: int, rng: np.random.Generator, center: np.ndarray) -> tuple[np.ndarray, str]:
    step = 0.012 * size
    width = rng.uniform(0.014, 0.022) * size
    total = rng.uniform(0.4, 0.6) * size
    walks, stack = [], [(center.copy(), rng.uniform(0, 2 * np.pi), total)]
    while stack and len(walks) < 7:
        position, heading, budget = stack.pop()
        path = [position.copy()]
        for i in range(int(budget / step)):
            heading += rng.normal(0, 0.45)  # jagged: the heading wanders every step
            position = position + step * np.array([np.cos(heading), np.sin(heading)])
            path.append(position.copy())
            if i > 3 and rng.random() < 0.06:  # a branch leaves at a sharp angle with a shorter budget
                stack.append((position.copy(), heading + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2), budget * 0.5))
        walks.append(np.array(path))

    def draw(d: ImageDraw.ImageDraw, s: int) -> None:
        for path in walks:
            d.line([tuple(p) for p in path * s], fill=255, width=max(1, round(width * s)), joint="curve")

    return rasterise(size, draw), f"a crack with {len(walks) - 1} branches" if len(walks) > 1 else "a jagged crack"


def _stain(size: int, rng: np.random.Generator, center: np.ndarray) -> tuple[np.ndarray, str]:
    radius = rng.uniform(0.09, 0.13) * size
    dx, dy = _grid(size, center)
    angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.55, 1.0)
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma=radius / 2.5)
    noise /= noise.std() + 1e-6
    distance = np.sqrt(u**2 + v**2) / radius + 0.25 * noise  # a wavy outline
    alpha = np.clip((1.3 - distance) / 0.6, 0, 1)  # a wide soft edge: the ink thins out
    return alpha * alpha * (3 - 2 * alpha), "an irregular stain"


def _hole(size: int, rng: np.random.Generator, center: np.ndarray) -> tuple[np.ndarray, str]:
    radius = rng.uniform(0.075, 0.1) * size
    aspect = rng.uniform(0.85, 1.0)

    def draw(d: ImageDraw.ImageDraw, s: int) -> None:
        rx, ry = radius * s, radius * aspect * s
        x, y = center * s
        d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)

    return rasterise(size, draw, supersample=4), "a round hole"


def _contamination(size: int, rng: np.random.Generator, center: np.ndarray) -> tuple[np.ndarray, str]:
    count = int(rng.integers(14, 28))
    offsets = rng.normal(0, rng.uniform(0.07, 0.1) * size, size=(count, 2))
    radii = rng.uniform(0.012, 0.024, size=count) * size

    def draw(d: ImageDraw.ImageDraw, s: int) -> None:
        for (ox, oy), rad in zip(offsets, radii, strict=True):
            x, y = (center[0] + ox) * s, (center[1] + oy) * s
            d.ellipse([x - rad * s, y - rad * s, x + rad * s, y + rad * s], fill=255)

    return rasterise(size, draw), f"a cluster of {count} specks"


def _dent(size: int, rng: np.random.Generator, center: np.ndarray) -> tuple[np.ndarray, str]:
    radius = rng.uniform(0.11, 0.15) * size
    dx, dy = _grid(size, center)
    r = np.sqrt(dx**2 + dy**2) / radius
    light = rng.uniform(0, 2 * np.pi)
    facing = (dx * np.cos(light) + dy * np.sin(light)) / (r * radius + 1e-6)  # -1..1 around the bowl
    ring = np.clip(1 - np.abs(r - 0.75) / 0.28, 0, 1)  # the bowl's wall
    alpha = ring * np.clip(facing * 1.4, 0, 1)  # shaded only on the side facing away from the light
    return alpha.astype(np.float32), "a dent"


SHAPE_PAINTERS: dict[str, Callable[[int, np.random.Generator, np.ndarray], tuple[np.ndarray, str]]] = {
    "scratch": _scratch,
    "crack": _crack,
    "stain": _stain,
    "hole": _hole,
    "contamination": _contamination,
    "dent": _dent,
}


def draw_ink(rng: np.random.Generator, severity: float = 0.5) -> tuple[bool, float, str]:
    """One defect's ink, the same distribution for every type: (darker?, strength, tint name).

    The strength is ``0.25 + 0.7 * severity`` times a factor in [0.65, 1.15] (0.39-0.69 at severity 0.5).
    """
    dark = bool(rng.random() < 0.5)
    strength = float(np.clip((0.25 + 0.7 * severity) * rng.uniform(0.65, 1.15), 0.05, 0.95))
    tint = "neutral" if rng.random() < 0.5 else str(rng.choice(list(INK_TINTS)[1:]))
    return dark, strength, tint


def apply_ink(image: np.ndarray, alpha: np.ndarray, ink: tuple[bool, float, str]) -> np.ndarray:
    """Blend ``ink`` into ``image`` (H, W, 3) float in [0, 1] with coverage ``alpha`` (H, W); same shape out."""
    dark, strength, tint = ink
    target = image * (1 - strength) if dark else image + (1 - image) * strength
    target = np.clip(target * np.asarray(INK_TINTS[tint], np.float32), 0, 1)
    return image * (1 - alpha[..., None]) + target * alpha[..., None]
