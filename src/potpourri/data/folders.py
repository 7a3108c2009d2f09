"""Anomaly-detection folders: an MVTec-AD category folder or a plain folder of normal images (``read_folder``), its
ground-truth masks, and ``ds-synth:<category>`` written once into the cache in the MVTec layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from potpourri.core.errors import PotpourriError
from potpourri.core.imaging import find_images
from potpourri.data.layouts import MVTecAD


@dataclass
class FolderData:
    """Normal training images and an optional labelled test set (mask paths None where missing)."""

    train: list[Path]
    test: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    mask_paths: list[Path | None] = field(default_factory=list)
    defect_types: list[str] = field(default_factory=list)
    layout: str = "folder"


def read_folder(spec: str) -> FolderData:
    """Read ``--data``: an MVTec-AD layout if ``train/good`` exists, else every image under the folder is normal."""
    if spec.startswith("ds-synth:"):
        return read_folder(str(ds_synth_category(spec.split(":", 1)[1])))
    root = Path(spec)
    if not root.is_dir():
        raise PotpourriError(f"--data '{spec}' is not a folder; pass an MVTec-AD category folder or a folder of images")
    if not (root / "train" / "good").is_dir():
        return FolderData(train=find_images([root]))
    train = MVTecAD(root.parent, root.name, "train")
    data = FolderData(train=[path for path, *_ in train.items], layout="mvtec")
    if (root / "test").is_dir():
        for path, label, mask_path, kinds in MVTecAD(root.parent, root.name, "test", require_masks=False).items:
            data.test.append(path)
            data.labels.append(label)
            data.mask_paths.append(mask_path)
            if label and kinds[0] not in data.defect_types:
                data.defect_types.append(kinds[0])
    return data


def ds_synth_category(category: str, *, seed: int = 0, size: int = 256, per_class: int = 10) -> Path:
    """The MVTec-AD folder of one DS-Synth category, generated once into the cache (same seed, same bytes)."""
    from potpourri.core.weights import cache_root
    from potpourri.data.synth import CATEGORIES, GENERATOR_VERSION, write_ds_synth

    if category not in CATEGORIES:
        raise PotpourriError(f"unknown DS-Synth category '{category}'; choose from {', '.join(CATEGORIES)}")
    import shutil
    import tempfile

    root = cache_root().parent / "ds-synth" / f"v{GENERATOR_VERSION}-seed{seed}-size{size}-n{per_class}"
    folder = root / category
    if not folder.is_dir():  # generate beside it, then rename: an interrupted run leaves no half-written category
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{category}."))
        try:
            write_ds_synth(staging, seed=seed, size=size, per_class=per_class, categories=[category], workers=1)
            staging.rename(folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return folder / "MVTec-Synth" / category


def truth_masks(data: FolderData, size: int) -> tuple[np.ndarray | None, list[str]]:
    """Binary (N, S, S) ground truth at the model size; None (with a note) if a defect image has no mask."""
    missing = [p.name for p, m, y in zip(data.test, data.mask_paths, data.labels, strict=True) if y and m is None]
    if missing:
        return None, [f"{len(missing)} defect images have no ground_truth mask (e.g. {missing[0]}): no pixel metrics"]
    masks = np.zeros((len(data.test), size, size), dtype=np.uint8)
    for index, mask_path in enumerate(data.mask_paths):
        if mask_path is not None:
            with Image.open(mask_path) as mask:
                mask = mask.convert("L").resize((size, size), Image.Resampling.NEAREST)
            masks[index] = np.asarray(mask) > 0
    return masks, []
