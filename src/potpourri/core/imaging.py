"""Reading images safely: one reader for the CLI, the data layouts and the inspection methods."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from potpourri.core.errors import PotpourriError

__all__ = ["IMAGE_SUFFIXES", "find_images", "load_rgb", "read_rgb"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB; one-line ``PotpourriError`` for missing, corrupt, truncated or
    transparent files. 16-bit grey keeps its top 8 bits (a fixed scale, so brightness stays comparable)."""
    path = Path(path)
    if not path.is_file():
        raise PotpourriError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()  # decode now so a truncated file fails here, not later in a worker
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                pixels = np.asarray(im, dtype=np.uint32)
                pixels = (pixels >> 8).clip(0, 255).astype(np.uint8) if pixels.max() > 255 else pixels.astype(np.uint8)
                return np.repeat(pixels[..., None], 3, axis=2)
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                rgba = np.asarray(im.convert("RGBA"))
                if (rgba[..., 3] < 255).any():
                    raise PotpourriError(
                        f"{path}: image has transparent pixels (mode {mode}); flatten it onto a background first, "
                        "since what lies under the transparency is unknown"
                    )
                return np.ascontiguousarray(rgba[..., :3])
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PotpourriError(
            f"{path}: cannot read image (corrupt or truncated: {exc}); re-export or remove it"
        ) from None


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """``read_rgb`` as a PIL image."""
    return Image.fromarray(read_rgb(path))


def find_images(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a sorted list of image files; an empty result is an error."""
    found: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found.extend(sorted(p for p in entry.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES))
        elif entry.exists():
            found.append(entry)
        else:
            raise PotpourriError(f"image '{entry}' does not exist")
    if not found:
        raise PotpourriError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, paths))}")
    return found


ImageInput = str | os.PathLike | Image.Image | np.ndarray


def as_rgb(image: ImageInput) -> Image.Image:
    """A path, PIL image or HxW(x3) uint8 array as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise PotpourriError(f"image array must be HxW or HxWx3 uint8, got {image.dtype} {image.shape}")
        return Image.fromarray(image).convert("RGB")
    return load_rgb(image)
