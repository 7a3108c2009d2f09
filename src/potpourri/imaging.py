"""Reading images safely and turning them into model inputs from a model's ``PretrainedCfg``."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as T

from potpourri.errors import PotpourriError
from potpourri.weights import PretrainedCfg

__all__ = ["IMAGE_SUFFIXES", "eval_transform", "find_images", "load_rgb"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as 8-bit RGB; a missing, corrupt or non-image file raises one clear line."""
    path = Path(path)
    if not path.is_file():
        raise PotpourriError(f"image '{path}' does not exist")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so a truncated file fails here, not later in a worker
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit greyscale: scale the full range to 8 bits instead of clipping at 255
                array = np.asarray(img, dtype=np.float64)
                span = max(float(array.max() - array.min()), 1.0)
                img = Image.fromarray(((array - array.min()) / span * 255).round().astype(np.uint8))
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise PotpourriError(f"'{path}' is not a readable image ({type(exc).__name__}: {exc})") from exc


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


def eval_transform(cfg: PretrainedCfg | None, *, image_size: int | None = None) -> T.Compose:
    """Resize (by ``crop_pct``), centre-crop, scale to [0, 1] and normalise, as the weights were trained.

    Example:
        x = eval_transform(get_pretrained_cfg("efficientnet_lite0"))(load_rgb("cat.jpg")).unsqueeze(0)
    """
    cfg = cfg or PretrainedCfg(name="default")
    size = image_size or cfg.input_size[-1]
    interpolation = T.InterpolationMode(cfg.interpolation)
    return T.Compose(
        [
            T.ToImage(),
            T.Resize(math.floor(size / cfg.crop_pct), interpolation=interpolation, antialias=True),
            T.CenterCrop(size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
        ]
    )
