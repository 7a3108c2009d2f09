"""ImageNet-C-style corruptions (19 kinds x 5 severities) for out-of-distribution evaluation, our own code.

The severity constants follow Hendrycks & Dietterich (ICLR 2019, "Benchmarking neural network robustness to common
corruptions and perturbations"). Frost uses a procedural ice texture instead of the original's photos, and the
weather effects (snow, spatter, fog) are re-derived from the paper's description, so their pixels differ from the
``imagecorruptions`` package while their severity scale matches. Every call is deterministic per seed.

Example:
    >>> import numpy as np
    >>> img = np.full((64, 64, 3), 128, np.uint8)
    >>> corrupt(img, "gaussian_noise", 3, seed=0).shape
    (64, 64, 3)
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from potpourri.core.errors import PotpourriError

__all__ = ["CORRUPTIONS", "Corrupted", "corrupt"]

Array = np.ndarray  # (H, W, 3) float32 in [0, 1] inside this module


# ----------------------------------------------------------------------------------------------- helpers
def _blur(x: Array, sigma: float) -> Array:
    return ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="reflect")


def _convolve(x: Array, kernel: np.ndarray) -> Array:
    return np.stack([ndimage.convolve(x[..., c], kernel, mode="reflect") for c in range(3)], axis=2)


def _rgb_to_hsv(x: Array) -> Array:
    from skimage.color import rgb2hsv

    return rgb2hsv(x)


def _hsv_to_rgb(x: Array) -> Array:
    from skimage.color import hsv2rgb

    return hsv2rgb(x)


def _zoom_center(x: Array, factor: float) -> Array:
    """Zoom in by ``factor`` about the centre, keeping the shape (H, W, 3)."""
    h, w = x.shape[:2]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[top : top + ch, left : left + cw]
    zoomed = ndimage.zoom(crop, (h / ch, w / cw, 1), order=1)
    return zoomed[:h, :w]


def _plasma(size: int, roughness: float, rng: np.random.Generator) -> np.ndarray:
    """A diamond-square fractal in [0, 1], (size, size); ``roughness`` is the per-octave amplitude decay."""
    n = 1 << int(np.ceil(np.log2(max(size, 2))))
    grid = np.zeros((n + 1, n + 1))
    grid[::n, ::n] = rng.uniform(-1, 1, (2, 2))
    step, scale = n, 1.0
    while step > 1:
        half = step // 2
        corners = grid[0:-1:step, 0:-1:step] + grid[step::step, 0:-1:step]
        corners = corners + grid[0:-1:step, step::step] + grid[step::step, step::step]
        grid[half::step, half::step] = corners / 4 + rng.uniform(-scale, scale, corners.shape)
        # square step: each edge midpoint averages its two corners and (where present) two centres
        for y0, x0 in ((0, half), (half, 0)):
            ys, xs = np.arange(y0, n + 1, step), np.arange(x0, n + 1, step)
            yy, xx = np.meshgrid(ys, xs, indexing="ij")
            total, count = np.zeros(yy.shape), np.zeros(yy.shape)
            for dy, dx in ((-half, 0), (half, 0), (0, -half), (0, half)):
                ny, nx = yy + dy, xx + dx
                ok = (ny >= 0) & (ny <= n) & (nx >= 0) & (nx <= n)
                total[ok] += grid[ny[ok], nx[ok]]
                count[ok] += 1
            grid[yy, xx] = total / count + rng.uniform(-scale, scale, yy.shape)
        step, scale = half, scale / roughness
    out = grid[:size, :size]
    return (out - out.min()) / (np.ptp(out) + 1e-12)


def _motion_kernel(radius: float, sigma: float, angle: float) -> np.ndarray:
    """A one-sided line kernel of Gaussian weights along ``angle`` degrees, normalised to sum 1."""
    length = int(2 * np.ceil(radius) + 1)
    kernel = np.zeros((length, length))
    centre = length // 2
    distances = np.arange(0, int(np.ceil(radius)) + 1)
    weights = np.exp(-(distances**2) / (2 * sigma**2))
    theta = np.deg2rad(angle)
    for d, wgt in zip(distances, weights, strict=True):
        y, x = round(centre - d * np.sin(theta)), round(centre + d * np.cos(theta))
        kernel[y, x] += wgt
    return kernel / kernel.sum()


def _disk(radius: float, alias_sigma: float) -> np.ndarray:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    kernel = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    kernel = ndimage.gaussian_filter(kernel / kernel.sum(), alias_sigma)
    return kernel / kernel.sum()


# ----------------------------------------------------------------------------------------------- noise
def gaussian_noise(x: Array, s: int, rng: np.random.Generator) -> Array:
    return x + rng.normal(0, [0.08, 0.12, 0.18, 0.26, 0.38][s - 1], x.shape)


def shot_noise(x: Array, s: int, rng: np.random.Generator) -> Array:
    photons = [60, 25, 12, 5, 3][s - 1]
    return rng.poisson(x * photons) / photons


def impulse_noise(x: Array, s: int, rng: np.random.Generator) -> Array:
    amount = [0.03, 0.06, 0.09, 0.17, 0.27][s - 1]
    hit = rng.random(x.shape) < amount  # salt and pepper per channel value, half each
    return np.where(hit, (rng.random(x.shape) < 0.5).astype(x.dtype), x)


def speckle_noise(x: Array, s: int, rng: np.random.Generator) -> Array:
    return x + x * rng.normal(0, [0.15, 0.2, 0.35, 0.45, 0.6][s - 1], x.shape)


# ----------------------------------------------------------------------------------------------- blur
def gaussian_blur(x: Array, s: int, rng: np.random.Generator) -> Array:
    return _blur(x, [1, 2, 3, 4, 6][s - 1])


def glass_blur(x: Array, s: int, rng: np.random.Generator) -> Array:
    # ImageNet-C's table (0.7,1,2) (0.9,2,1) (1,2,3) (1.1,3,2) (1.5,4,2) is not monotone; ours adds work each level
    sigma, max_delta, iterations = [(0.7, 1, 1), (0.9, 2, 1), (1, 2, 2), (1.1, 3, 2), (1.5, 4, 3)][s - 1]
    x = _blur(x, sigma)
    h, w = x.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(iterations):  # each pixel takes the value of a random neighbour within max_delta
        dy, dx = rng.integers(-max_delta, max_delta, (2, h, w))
        x = x[np.clip(yy + dy, 0, h - 1), np.clip(xx + dx, 0, w - 1)]
    return _blur(x, sigma)


def defocus_blur(x: Array, s: int, rng: np.random.Generator) -> Array:
    radius, alias = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)][s - 1]
    return _convolve(x, _disk(radius, alias))


def motion_blur(x: Array, s: int, rng: np.random.Generator) -> Array:
    radius, sigma = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)][s - 1]
    return _convolve(x, _motion_kernel(radius, sigma, rng.uniform(-45, 45)))


def zoom_blur(x: Array, s: int, rng: np.random.Generator) -> Array:
    top, step = [(1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)][s - 1]
    factors = np.arange(1, top, step)
    return (x + sum(_zoom_center(x, f) for f in factors)) / (len(factors) + 1)


# ----------------------------------------------------------------------------------------------- weather
def snow(x: Array, s: int, rng: np.random.Generator) -> Array:
    loc, scale, zoom, threshold, radius, sigma, keep = [
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.4, 0.3, 3, 0.6, 12, 6, 0.65),  # ImageNet-C: (0.55, 0.3, 4, 0.9, 12, 8, 0.7), less snow than level 2
        (0.5, 0.3, 3.5, 0.6, 12, 8, 0.6),
        (0.55, 0.3, 2.5, 0.6, 12, 12, 0.55),
    ][s - 1]
    h, w = x.shape[:2]
    flakes = rng.normal(loc, scale, (int(np.ceil(h / zoom)), int(np.ceil(w / zoom))))
    flakes = ndimage.zoom(flakes, zoom, order=1)[:h, :w]
    flakes = np.where(flakes < threshold, 0, flakes)
    kernel = _motion_kernel(radius, sigma, rng.uniform(-135, -45))
    streaks = np.clip(ndimage.convolve(flakes, kernel, mode="reflect"), 0, 1)[..., None]
    grey = x.mean(axis=2, keepdims=True)
    x = keep * x + (1 - keep) * np.maximum(x, grey * 1.5 + 0.5)  # the scene whitens under falling snow
    return x + streaks + np.rot90(streaks, 2)


def frost(x: Array, s: int, rng: np.random.Generator) -> Array:
    # a blend towards an ice layer whose weight grows with severity (ImageNet-C's keep/ice table is not monotone)
    weight = [0.25, 0.35, 0.45, 0.55, 0.65][s - 1]
    h, w = x.shape[:2]
    # procedural ice: fractal haze plus sharp crystal speckle (the original blends photos of frost)
    haze = _plasma(max(h, w), 1.6, rng)[:h, :w]
    crystals = ndimage.gaussian_filter(rng.random((h, w)), 1.0)
    crystals = np.clip((crystals - crystals.mean()) / (crystals.std() + 1e-6), 0, None) * 0.25
    frost_layer = np.clip(0.45 + 0.45 * haze + crystals, 0, 1)[..., None] * np.array([0.88, 0.94, 1.0])
    return (1 - weight) * x + weight * frost_layer


def fog(x: Array, s: int, rng: np.random.Generator) -> Array:
    density, roughness = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)][s - 1]
    h, w = x.shape[:2]
    peak = x.max()
    haze = _plasma(max(h, w), roughness, rng)[:h, :w, None]
    return (x + density * haze) * peak / (peak + density)


def spatter(x: Array, s: int, rng: np.random.Generator) -> Array:
    # drops where a smoothed noise field crosses a threshold: water (levels 1-3), then mud (4-5), as ImageNet-C does
    sigma, threshold, opacity, mud = [(4, 2.2, 0.5, 0), (3, 1.9, 0.55, 0), (2, 1.6, 0.6, 0), (1.5, 1.3, 0.8, 1),
                                      (1, 1.0, 0.9, 1)][s - 1]  # fmt: skip
    field_ = ndimage.gaussian_filter(rng.standard_normal(x.shape[:2]), sigma)
    drops = np.clip((field_ / (field_.std() + 1e-12) - threshold) / 0.3, 0, 1)
    drops = ndimage.gaussian_filter(drops, 0.8)[..., None] * opacity
    colour = np.array([63, 42, 20]) / 255.0 if mud else np.array([175, 238, 238]) / 255.0
    return x * (1 - drops) + colour * drops


# ----------------------------------------------------------------------------------------------- digital
def brightness(x: Array, s: int, rng: np.random.Generator) -> Array:
    hsv = _rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + [0.1, 0.2, 0.3, 0.4, 0.5][s - 1], 0, 1)
    return _hsv_to_rgb(hsv)


def contrast(x: Array, s: int, rng: np.random.Generator) -> Array:
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * [0.4, 0.3, 0.2, 0.1, 0.05][s - 1] + means


def saturate(x: Array, s: int, rng: np.random.Generator) -> Array:
    gain, offset = [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)][s - 1]
    hsv = _rgb_to_hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * gain + offset, 0, 1)
    return _hsv_to_rgb(hsv)


def jpeg_compression(x: Array, s: int, rng: np.random.Generator) -> Array:
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(x)).save(buffer, "JPEG", quality=[25, 18, 15, 10, 7][s - 1])
    return np.asarray(Image.open(buffer), np.float32) / 255.0


def pixelate(x: Array, s: int, rng: np.random.Generator) -> Array:
    h, w = x.shape[:2]
    factor = [0.6, 0.5, 0.4, 0.3, 0.25][s - 1]
    small = Image.fromarray(_to_uint8(x)).resize((int(w * factor), int(h * factor)), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BOX), np.float32) / 255.0


def elastic_transform(x: Array, s: int, rng: np.random.Generator) -> Array:
    h, w = x.shape[:2]
    alpha = [250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12][s - 1] * max(h, w) / 224
    sigma = max(h, w) * 0.01 * [1.0, 1.2, 1.4, 1.6, 1.8][s - 1]
    max_shift = max(h, w) * 0.005 * s
    dy = ndimage.gaussian_filter(rng.uniform(-max_shift, max_shift, (h, w)), sigma) * alpha
    dx = ndimage.gaussian_filter(rng.uniform(-max_shift, max_shift, (h, w)), sigma) * alpha
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    coords = [yy + dy, xx + dx]
    return np.stack([ndimage.map_coordinates(x[..., c], coords, order=1, mode="reflect") for c in range(3)], axis=2)


CORRUPTIONS: dict[str, Callable[[Array, int, np.random.Generator], Array]] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "gaussian_blur": gaussian_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "spatter": spatter,
    "brightness": brightness,
    "contrast": contrast,
    "saturate": saturate,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}


def _to_uint8(x: Array) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def corrupt(image: np.ndarray, name: str, severity: int, *, seed: int = 0) -> np.ndarray:
    """Apply corruption ``name`` at ``severity`` (1-5) to an (H, W, 3) uint8 image; deterministic per ``seed``."""
    if name not in CORRUPTIONS:
        raise PotpourriError(f"unknown corruption '{name}'; choose from {', '.join(CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise PotpourriError(f"corruption severity {severity!r} is not one of 1, 2, 3, 4, 5")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise PotpourriError(f"corrupt() needs an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, list(CORRUPTIONS).index(name)]))
    out = CORRUPTIONS[name](image.astype(np.float32) / 255.0, severity, rng)
    return _to_uint8(np.asarray(out))


class Corrupted:
    """Wrap a dataset of ``Sample``s (or (H, W, 3) uint8 arrays): item ``i`` is corrupted with seed ``(seed, i)``.

    Example:
        >>> from potpourri.data.layouts import DSSynth
        >>> ds = Corrupted(DSSynth("brick", "test", 4, size=64), "fog", 3)
        >>> ds[0].image.shape
        (64, 64, 3)
    """

    def __init__(self, dataset: Any, name: str, severity: int, *, seed: int = 0) -> None:
        corrupt(np.zeros((8, 8, 3), np.uint8), name, severity)  # validate name and severity now, not at item 0
        self.dataset, self.name, self.severity, self.seed = dataset, name, severity, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        seed = int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0])
        if isinstance(item, np.ndarray):
            return corrupt(item, self.name, self.severity, seed=seed)
        if not isinstance(item.image, np.ndarray):
            raise PotpourriError("Corrupted needs the wrapped dataset to return uint8 arrays; apply transforms after")
        item.image = corrupt(item.image, self.name, self.severity, seed=seed)
        return item
