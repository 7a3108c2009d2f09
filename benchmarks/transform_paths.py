"""How far apart are the two inference preprocessing paths? PatchCore's PIL bicubic resize vs ``model_transform``'s
antialiased ``torch.nn.functional.interpolate`` (bicubic), on real photos, in grey levels (0-255).

Run: ``.venv/bin/python benchmarks/transform_paths.py``. Prints mean and max absolute difference per photo.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from skimage import data

from potpourri.core.registry import get_pretrained_cfg
from potpourri.data.transforms import model_transform


def main() -> None:
    cfg = get_pretrained_cfg("efficientnet_lite0")
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    to_input = model_transform(cfg, size=224)
    for name in ("astronaut", "coffee", "chelsea"):
        image = getattr(data, name)()[:256, :256]
        torch_path = to_input(image)  # (3, 224, 224), normalised
        pil = Image.fromarray(image).resize((224, 224), Image.Resampling.BICUBIC)
        pil_path = (torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1) - mean) / std
        grey_levels = ((torch_path - pil_path).abs() * std * 255).flatten()
        print(f"{name:<10} mean {grey_levels.mean():.2f}  max {grey_levels.max():.2f} grey levels")


if __name__ == "__main__":
    main()
