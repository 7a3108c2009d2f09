"""Reading images safely: one reader for the CLI, the data layouts and the inspection methods."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from potpourri.core.errors import PotpourriError

__all__ = ["IMAGE_SUFFIXES", "ImageInput", "as_rgb", "find_images", "load_rgb", "read_mask", "read_rgb"]

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


_INDEX_MODES = ("L", "P", "I", "I;16", "1")


def _mask_pixels(image: Image.Image, where: str) -> np.ndarray:
    """The class ids of a mask image; RGB(A) is accepted only when every pixel is grey (a re-saved index mask)."""
    if image.mode in ("RGB", "RGBA"):
        pixels = np.asarray(image.convert("RGB"))
        if not (pixels[..., 0] == pixels[..., 1]).all() or not (pixels[..., 1] == pixels[..., 2]).all():
            raise PotpourriError(f"{where}: mask is a colour image, not a class-index image; save one grey channel")
        return pixels[..., 0]
    if image.mode not in _INDEX_MODES:
        raise PotpourriError(f"{where}: mask mode {image.mode} is not a class-index image; save one channel of ids")
    return np.asarray(image)


def read_mask(
    source: str | os.PathLike | np.ndarray | Image.Image,
    *,
    shape: tuple[int, int] | None = None,
    image_path: str | os.PathLike | None = None,
    eight_bit: bool = False,
) -> np.ndarray:
    """A class-index mask (H, W) of int64 ids from a file, a PIL image or an integer array; one-line errors.

    ``shape``: the (H, W) of its image, which it must match; ``eight_bit``: ids must fit in uint8 (returned as uint8).
    """
    where = "mask"
    if isinstance(source, str | os.PathLike):
        where = str(source)
        try:
            with Image.open(source) as image:
                image.load()
                mask = _mask_pixels(image, where)
        except FileNotFoundError:
            raise PotpourriError(f"{where}: mask file not found; pass a class-index PNG (0 = background)") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise PotpourriError(
                f"{where}: cannot read mask (corrupt or truncated: {exc}); re-export or remove it"
            ) from None
    elif isinstance(source, Image.Image):
        mask = _mask_pixels(source, where)
    else:
        mask = np.asarray(source)
    if mask.ndim != 2 or not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
        raise PotpourriError(
            f"{where}: a mask must be an (H, W) image of integer class ids, got {mask.dtype} {mask.shape}"
        )
    if mask.size and mask.min() < 0:
        raise PotpourriError(f"{where}: mask holds negative class ids; use 0 for background and 1..K for classes")
    if eight_bit and mask.max(initial=0) > 255:
        raise PotpourriError(f"{where}: mask values reach {mask.max()}; class indices must fit in 8 bits")
    if shape is not None and mask.shape != tuple(shape):
        of = f" {image_path}" if image_path else ""
        raise PotpourriError(
            f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} but its image{of} is {shape[1]}x{shape[0]}; "
            "resize the mask with nearest-neighbour interpolation"
        )
    return mask.astype(np.uint8 if eight_bit else np.int64)
