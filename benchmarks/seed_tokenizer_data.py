"""DS-Synth images for the SEED tokenizer scripts: every category, normalised (ImageNet mean/std, as measured)."""

from __future__ import annotations

import numpy as np
import torch

from potpourri.data.synth import CATEGORIES, make_samples
from potpourri.data.transforms import normalized_dataset

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load(split: str, n: int, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images per category of ``split``: normalised (N, 3, size, size) floats and category ids (N,)."""
    samples = [(c, s.image) for c, name in enumerate(CATEGORIES) for s in make_samples(name, split, n, size=size)]
    images = np.stack([image for _, image in samples])
    cats = np.array([c for c, _ in samples], dtype=np.int64)
    return normalized_dataset(images, cats, IMAGENET_MEAN, IMAGENET_STD).tensors
