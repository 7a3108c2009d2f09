"""Image–caption pairs for training a CLIP-style model here, from DS-Synth and the clutter set (in memory, seeded).

Three sources, each an ``(image, caption)`` list:

- whole DS-Synth images with their own captions ("a brick surface with a short dark scratch in the center");
- a close-up centred on each defect, captioned with the defect's words and no location (a crop's "top left" is
  not the image's), plus one close-up of every good image;
- clutter images captioned by the object's colour family and shape ("a warm-coloured disk among clutter").

Which surfaces a model sees is the caller's choice; ``potpourri reproduce clip-small`` trains on three and holds
two out, so its evaluation is zero-shot with respect to those surfaces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from potpourri.core.errors import PotpourriError
from potpourri.data.clutter import CLUTTER_CLASSES, make_clutter
from potpourri.data.synth import CLASSES, MULTI, Defect, SynthSample, location_phrase, make_samples

__all__ = [
    "CaptionPairs",
    "class_prompts",
    "clutter_pairs",
    "concat_pairs",
    "defect_words",
    "synth_pairs",
]


@dataclass
class CaptionPairs:
    """Images with one caption each, and where each came from."""

    images: np.ndarray  # (N, S, S, 3) uint8
    captions: list[str]
    sources: list[str] = field(default_factory=list)  # "image" | "crop" | "clutter"
    categories: list[str] = field(default_factory=list)  # DS-Synth surface, or "clutter"
    kinds: list[str] = field(default_factory=list)  # DS-Synth kind (good, a defect, multi) or clutter class

    def __len__(self) -> int:
        return len(self.captions)

    def caption_ids(self) -> tuple[list[str], np.ndarray]:
        """Distinct captions (sorted) and the (N,) index of each pair's caption among them."""
        distinct = sorted(set(self.captions))
        lookup = {c: i for i, c in enumerate(distinct)}
        return distinct, np.array([lookup[c] for c in self.captions], dtype=np.int64)


def defect_words(defect: Defect, size: int) -> str:
    """The caption words of one defect without its location: "a short dark scratch"."""
    return defect.phrase.removesuffix(" " + location_phrase(defect.center, size))


def class_prompts(category: str, *, classes: Sequence[str] = CLASSES) -> list[str]:
    """One hand-written sentence per DS-Synth class on ``category``: "a moon surface with a crack"."""
    return [
        f"a {category} surface with no defect" if c == "good" else f"a {category} surface with a {c}" for c in classes
    ]


def _crop(image: np.ndarray, center: tuple[float, float], side: int) -> np.ndarray:
    """A ``side`` px square around ``center`` (y, x), moved inside the image, resized back to the image's size."""
    size = image.shape[0]
    y0 = int(np.clip(round(center[0] - side / 2), 0, size - side))
    x0 = int(np.clip(round(center[1] - side / 2), 0, size - side))
    crop = Image.fromarray(image[y0 : y0 + side, x0 : x0 + side])
    return np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC))


def synth_pairs(
    categories: Sequence[str],
    split: str,
    per_kind: int,
    *,
    size: int = 128,
    seed: int = 0,
    crops: bool = True,
    kinds: Sequence[str] = (*CLASSES, MULTI),
) -> CaptionPairs:
    """``per_kind`` DS-Synth images per kind and surface with their captions, plus close-ups when ``crops``.

    Example:
        pairs = synth_pairs(("brick", "grass"), "train", 4, size=128)   # 2 x 8 kinds x 4 images + close-ups
    """
    if per_kind < 1:
        raise PotpourriError(f"per_kind must be >= 1, got {per_kind}")
    images, captions, sources, cats, kind_names = [], [], [], [], []

    def add(image: np.ndarray, caption: str, source: str, sample: SynthSample) -> None:
        images.append(image)
        captions.append(caption)
        sources.append(source)
        cats.append(sample.category)
        kind_names.append(sample.kind)

    side = size // 2
    for category in categories:
        for sample in make_samples(category, split, per_kind * len(kinds), seed=seed, size=size, kinds=kinds):
            add(sample.image, sample.caption, "image", sample)
            if not crops:
                continue
            surface = f"a close-up of a {category} surface"
            if not sample.defects:
                add(_crop(sample.image, (size / 2, size / 2), side), f"{surface} with no defect", "crop", sample)
            for defect in sample.defects:
                add(_crop(sample.image, defect.center, side), f"{surface} with {defect_words(defect, size)}", "crop",
                    sample)  # fmt: skip
    return CaptionPairs(np.stack(images), captions, sources, cats, kind_names)


def clutter_pairs(n: int, *, size: int = 128, seed: int = 0) -> CaptionPairs:
    """``n`` clutter images captioned "a warm-coloured disk among clutter" (colour family and shape of the object)."""
    images, labels, _ = make_clutter(n, size=size, seed=seed)
    names = [CLUTTER_CLASSES[int(label)] for label in labels]
    captions = [f"a {name.split('-')[0]}-coloured {name.split('-')[1]} among clutter" for name in names]
    return CaptionPairs(images, captions, ["clutter"] * n, ["clutter"] * n, names)


def concat_pairs(*parts: CaptionPairs) -> CaptionPairs:
    """All pairs of ``parts`` in order (images must share one size)."""
    parts = tuple(p for p in parts if len(p))
    if not parts:
        raise PotpourriError("no caption pairs to join")
    sizes = {p.images.shape[1:] for p in parts}
    if len(sizes) > 1:
        raise PotpourriError(f"caption pairs of different image shapes {sorted(sizes)}; build them at one size")
    return CaptionPairs(
        np.concatenate([p.images for p in parts]),
        [c for p in parts for c in p.captions],
        [s for p in parts for s in p.sources],
        [c for p in parts for c in p.categories],
        [k for p in parts for k in p.kinds],
    )
