"""Model input transforms resolved from a model's ``PretrainedCfg`` (input size, mean, std, interpolation).

``eval_transform`` resizes by ``crop_pct`` and centre-crops, as ImageNet photos are classified; ``model_transform``
resizes the whole image (inspection: never crop a defect away).

Example:
    >>> from potpourri.data.transforms import model_transform
    >>> to_input = model_transform("efficientnet_lite0")
    >>> import numpy as np; to_input(np.zeros((100, 80, 3), np.uint8)).shape
    torch.Size([3, 224, 224])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T

from potpourri.core.errors import PotpourriError
from potpourri.core.weights import PretrainedCfg

__all__ = ["eval_transform", "images_to_tensor", "model_transform", "normalized_dataset"]


def model_transform(model: str | PretrainedCfg, *, size: int | None = None) -> Callable[[np.ndarray], torch.Tensor]:
    """(H, W, 3) uint8 -> (3, S, S) float tensor: resized to the config's input size and normalised by its mean/std."""
    if isinstance(model, str):
        from potpourri.core.registry import get_pretrained_cfg

        cfg = get_pretrained_cfg(model)
        if cfg is None:
            raise PotpourriError(f"model '{model}' has no pretrained config; pass a PretrainedCfg instead")
    else:
        cfg = model
    side = size or cfg.input_size[-1]
    mode = "bicubic" if cfg.interpolation == "bicubic" else "bilinear"
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1)

    def transform(image: np.ndarray) -> torch.Tensor:
        x = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255.0  # (3, H, W), a copy
        if x.shape[1:] != (side, side):
            x = F.interpolate(x[None], size=(side, side), mode=mode, antialias=True, align_corners=False)[0]
            x = x.clamp(0, 1)
        return (x - mean) / std

    return transform


def eval_transform(
    cfg: PretrainedCfg | None, *, image_size: int | None = None, crop_pct: float | None = None
) -> T.Compose:
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
            T.Resize(math.floor(size / (crop_pct or cfg.crop_pct)), interpolation=interpolation, antialias=True),
            T.CenterCrop(size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
        ]
    )


def images_to_tensor(
    images: np.ndarray | Sequence[np.ndarray],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """(N, H, W, 3) uint8 images -> (N, 3, H, W) float32 in [0, 1], then normalised by ``mean``/``std`` if given.

    The result keeps the channels-last strides of the permute; call ``.contiguous()`` where a kernel needs NCHW.
    """
    stacked = images if isinstance(images, np.ndarray) else np.stack(images)
    x = torch.from_numpy(np.ascontiguousarray(stacked)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    if mean is None or std is None:
        return x
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def normalized_dataset(
    images: np.ndarray, labels: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.utils.data.TensorDataset:
    """(N, H, W, 3) uint8 images and (N,) labels as a TensorDataset of normalised (N, 3, H, W) floats."""
    return torch.utils.data.TensorDataset(images_to_tensor(images, mean, std), torch.from_numpy(labels))
