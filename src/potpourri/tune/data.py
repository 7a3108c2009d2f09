"""Image data for tuning: an ImageFolder directory (or DIR/train + DIR/val) or a DS-Synth task, normalised for a
model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from potpourri.core.errors import PotpourriError


def _ds_synth(
    spec: str, *, img_size: int, mean: tuple, std: tuple, seed: int = 0, version: str = "1"
) -> tuple[Dataset, Dataset, list[str]]:
    """``classification[:cat1,cat2]`` of DS-Synth ``version``; val = the disjoint test split.

    Version 1 keeps its old settings (10 images per class and surface, severity 0.5); version 2 is the pinned
    classification benchmark (``synth.BENCHMARK_V2``).
    """
    from potpourri.data.synth import BENCHMARK_V2, CATEGORIES, make_task
    from potpourri.data.transforms import normalized_dataset

    task, _, cats = spec.partition(":")
    if task != "classification":
        raise PotpourriError(f"unknown DS-Synth task '{task}' for tune; use ds-synth:classification[:brick,grass]")
    categories = tuple(cats.split(",")) if cats else ("brick", "grass", "gravel")
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise PotpourriError(f"unknown DS-Synth category '{unknown[0]}'; choose from {', '.join(CATEGORIES)}")
    settings = BENCHMARK_V2 if version == "2" else {"version": "1", "n_per_class": 10, "severity": 0.5}
    data = make_task(task, categories=categories, seed=seed, size=img_size, **settings)
    train = normalized_dataset(data.train_images, data.train_labels, mean, std)
    return train, normalized_dataset(data.test_images, data.test_labels, mean, std), data.class_names


def load_image_data(
    spec: str, *, img_size: int, mean: tuple, std: tuple, val_fraction: float = 0.2, seed: int = 0
) -> tuple[Dataset, Dataset, list[str]]:
    """``(train, val, class_names)`` from ``DIR`` (ImageFolder, or DIR/train + DIR/val), ``ds-synth:<task>`` (v1) or
    ``ds-synth-v2:<task>`` (the v2 classification benchmark)."""
    from potpourri.core.weights import PretrainedCfg
    from potpourri.data.transforms import eval_transform

    for prefix, version in (("ds-synth:", "1"), ("ds-synth-v2:", "2")):
        if spec.startswith(prefix):
            return _ds_synth(spec[len(prefix) :], img_size=img_size, mean=mean, std=std, seed=seed, version=version)
    from torchvision import datasets

    root = Path(spec).expanduser()
    if not root.is_dir():
        raise PotpourriError(f"--data '{spec}' is not a folder; pass an ImageFolder directory or ds-synth:<task>")
    # the one transform path (torchvision v2): short side to img_size (bilinear), centre crop, scale, normalise
    transform = eval_transform(
        PretrainedCfg(name="tune", mean=tuple(mean), std=tuple(std), interpolation="bilinear"),
        image_size=img_size,
        crop_pct=1.0,
    )

    def folder(path: Path) -> Dataset:
        try:
            return datasets.ImageFolder(str(path), transform=transform)
        except (FileNotFoundError, RuntimeError) as exc:
            raise PotpourriError(f"--data '{path}' holds no class folders with images ({exc})") from exc

    if (root / "train").is_dir() and (root / "val").is_dir():
        train, val = folder(root / "train"), folder(root / "val")
        classes = train.classes
    else:
        full = folder(root)
        classes = full.classes
        targets = torch.as_tensor(full.targets)
        generator = torch.Generator().manual_seed(seed)
        train_idx, val_idx = [], []
        for label in targets.unique():  # stratified split, same for the same seed
            members = (targets == label).nonzero().flatten()
            members = members[torch.randperm(len(members), generator=generator)]
            n_val = max(1, round(len(members) * val_fraction)) if len(members) > 1 else 0
            val_idx += members[:n_val].tolist()
            train_idx += members[n_val:].tolist()
        train, val = Subset(full, sorted(train_idx)), Subset(full, sorted(val_idx))
        train.targets = targets[sorted(train_idx)].tolist()
    if len(classes) < 2:
        raise PotpourriError(f"--data '{spec}' has a single class ({classes[0]}); a classifier needs at least 2")
    return train, val, classes


def check_workers(workers: int) -> None:
    cores = os.cpu_count() or 1
    if workers > cores:
        raise PotpourriError(
            f"--workers {workers} is more than the {cores} cores of this machine; use --workers {cores}"
        )


def prompt_width(image_size: int) -> int:
    """The width of AutoVP's ``fully`` prompt frame that ``tune --strategy visual-prompt`` builds."""
    return max(1, image_size // 12)


def input_spec(
    model_name: str, image_size: int | None, strategy: str | None
) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """``(image_size, mean, std)`` the tuned model sees: the model's pretrained config unless overridden; AutoVP's
    prompt takes [0, 1] pixels (mean 0, std 1)."""
    from potpourri.core.registry import create_model

    probe = create_model(model_name, pretrained=False)
    cfg = getattr(probe, "pretrained_cfg", {}) or {}
    mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    if strategy == "visual-prompt":
        mean, std = (0.0,) * 3, (1.0,) * 3
    return image_size or int(cfg.get("input_size", (3, 224, 224))[-1]), mean, std


def model_and_data(
    model_name: str,
    data_spec: str,
    *,
    image_size: int | None = None,
    pretrained: bool = True,
    seed: int = 0,
    strategy: str | None = None,
    workers: int = 0,
    threads: int | None = None,
) -> tuple[torch.nn.Module, Dataset, Dataset, list[str]]:
    """The model to tune (a new head for the data's classes, or AutoVP's prompt for ``visual-prompt``) and the
    (train, val, class names) of ``data_spec``, normalised as the model's pretrained config says."""
    from potpourri.core.registry import create_model
    from potpourri.tune.data import check_workers, load_image_data

    check_workers(workers)
    if threads:
        torch.set_num_threads(threads)
    img_size, mean, std = input_spec(model_name, image_size, strategy)
    if strategy == "visual-prompt":  # AutoVP: ImageNet head kept, prompt takes [0, 1] px
        from potpourri.tune.visual_prompt import VPConfig, build_visual_prompt

        train, val, classes = load_image_data(data_spec, img_size=img_size, mean=mean, std=std, seed=seed)
        source = create_model(model_name, pretrained=pretrained)
        frame = VPConfig("fully", width=prompt_width(img_size))
        model = build_visual_prompt(source, len(classes), frame, canvas=img_size)
        return model, train, val, classes
    train, val, classes = load_image_data(data_spec, img_size=img_size, mean=mean, std=std, seed=seed)
    torch.manual_seed(seed)  # the new head's initialisation
    model = create_model(model_name, pretrained=pretrained, num_classes=len(classes))
    if strategy == "siamese-subtuning":  # a frozen copy beside the tuned one; the head reads both
        from potpourri.models.siamese import SiameseSubTuned

        model = SiameseSubTuned(model, len(classes))
    return model, train, val, classes
