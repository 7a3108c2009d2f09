"""``potpourri reproduce words-annotation``: defect annotations in words instead of boxes, on DS-Synth v2.

Not a paper's method: the closing question of the ICLR 2024 talk ("can vision annotations become human language
instead of boxes?") asked of our own pieces. A defect region is written as one sentence (``data/describe.py``), the
sentence is parsed back into a region prior, and the prior prompts our small SAM (``segment/sam.py``, trained here)
and our defect segmenter (``segment/segmenter.py``, trained here). Measured on held-out DS-Synth v2 images:

1. mask IoU from words alone vs from the tight box vs from one centre click (``segment/words.evaluate_words``);
2. description accuracy: the sentence written from the segmenter's *predicted* mask names the true kind, grid
   cell, shape and extent (the truth's words come from the true mask).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from potpourri.core.training import TrainOptions

__all__ = ["WordsConfig", "reproduce_words", "run"]


@dataclass
class WordsConfig:
    categories: tuple[str, ...] = ("brick", "grass", "gravel")
    image_size: int = 128
    train_per_category: int = 100  # half single-defect, half multi-defect images (SAM and segmenter share them)
    test_per_category: int = 24
    sam_steps: int = 1200
    segmenter_steps: int = 400
    version: str = "2"
    seed: int = 0


def _samples(cfg: WordsConfig, split: str, per_category: int) -> list:
    from potpourri.data.synth import DEFECTS, MULTI, make_samples

    singles = per_category - per_category // 2
    out = []
    for category in cfg.categories:
        kw = {"seed": cfg.seed, "size": cfg.image_size, "version": cfg.version}
        out += make_samples(category, split, singles, kinds=DEFECTS, **kw)
        out += make_samples(category, split, per_category // 2, kinds=(MULTI,), **kw)
    return out


def reproduce_words(cfg: WordsConfig, out: str | None = None, options: TrainOptions | None = None, *, quick=False):
    """Train the small SAM and the segmenter on DS-Synth v2 training rows; score words as prompts and as
    descriptions of predicted masks on held-out rows; write ``results.md`` and ``summary.json``."""
    from potpourri.core.registry import create_model
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.data.synth import CLASSES
    from potpourri.models.sam import Sam, SamConfig
    from potpourri.segment.sam import train_sam
    from potpourri.segment.segmenter import Segmenter, SegmenterConfig
    from potpourri.segment.words import description_accuracy, evaluate_words, kind_regions

    options = options or TrainOptions(progress=False)
    started = time.perf_counter()
    run = new_run("reproduce-words-annotation", out, config=asdict(cfg), seed=cfg.seed)
    seed_everything(cfg.seed)
    train, test = _samples(cfg, "train", cfg.train_per_category), _samples(cfg, "test", cfg.test_per_category)
    train_images, train_masks = np.stack([s.image for s in train]), np.stack([s.mask for s in train])
    test_images, test_masks = np.stack([s.image for s in test]), np.stack([s.mask for s in test])
    backbone = create_model("efficientnet_lite0", pretrained=True)
    sam_cfg = SamConfig(image_size=cfg.image_size, steps=cfg.sam_steps, seed=cfg.seed)
    sam = Sam(sam_cfg, backbone=backbone)
    train_items = [(i, region) for i, _, region in kind_regions(train_masks, CLASSES)]
    train_sam(sam, train_images, train_items, options=options)
    sam.cpu().eval()
    sam_s = time.perf_counter() - started
    segmenter = Segmenter(SegmenterConfig(image_size=cfg.image_size, steps=cfg.segmenter_steps, seed=cfg.seed))
    segmenter.fit(train_images, train_masks, progress=False, options=options)
    seg_s = time.perf_counter() - started - sam_s
    probs = segmenter.predict_proba(test_images, device="cpu")
    items = kind_regions(test_masks, CLASSES)
    with torch.no_grad():
        prompts = evaluate_words(sam, test_images, items, probs=probs, class_names=CLASSES)
    singles = [k for k, s in enumerate(test) if s.kind in CLASSES[1:]]
    truths = [(test_masks[k] == CLASSES.index(test[k].kind), test[k].kind) for k in singles]
    described = description_accuracy(truths, probs[singles].argmax(1), CLASSES)
    oracle = description_accuracy(truths, test_masks[singles].astype(np.int64), CLASSES)  # true masks: must be 1.0
    seconds = time.perf_counter() - started
    methods = [k for k in prompts if k not in ("per_kind", "regions")]
    lines = [
        f"Annotations in words on DS-Synth v{cfg.version} ({', '.join(cfg.categories)}, {cfg.image_size} px, seed "
        f"{cfg.seed}{', QUICK smoke run: numbers not meaningful' if quick else ''}). Small SAM and segmenter trained "
        f"here on {len(train)} training images ({len(train_items)} regions; SAM {cfg.sam_steps} steps, segmenter "
        f"{cfg.segmenter_steps}); scored on {len(test)} held-out images ({prompts['regions']} regions).",
        "",
        "Mask IoU per region by prompt (the sentence is written from the true region, then parsed back):",
        "",
        "| prompt | mIoU |",
        "|---|---|",
        *(f"| {m} | {prompts[m]:.3f} |" for m in methods),
        "",
        "| kind | regions | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
        *(
            f"| {k} | {v['regions']} | " + " | ".join(f"{v[m]:.3f}" for m in methods) + " |"
            for k, v in prompts["per_kind"].items()
        ),
        "",
        f"Description accuracy on {described['images']} held-out single-defect images: the sentence written from the "
        "segmenter's predicted mask (its largest defect class) against the words of the true mask.",
        "",
        "| field | from predicted mask | from true mask (check) |",
        "|---|---|---|",
        *(f"| {f} | {described[f]:.3f} | {oracle[f]:.3f} |" for f in ("kind", "cell", "shape", "size", "extent")),
        "",
        f"Train SAM {sam_s:.0f} s, segmenter {seg_s:.0f} s; total {seconds:.0f} s.",
    ]
    (run.path / "results.md").write_text("\n".join(lines) + "\n")
    run.write_summary({"prompts": prompts, "description": described, "description_true_masks": oracle,
                       "train_images": len(train), "test_images": len(test), "seconds": round(seconds, 1)})  # fmt: skip
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None, seed: int = 0):
    """``potpourri reproduce words-annotation`` (or its smoke run: 64 px, a few images and steps); ``seed`` seeds the
    images, both models' training and the scoring."""
    cfg = WordsConfig(seed=seed)
    if quick:
        cfg = WordsConfig(categories=("brick",), image_size=64, train_per_category=4, test_per_category=4,
                          sam_steps=3, segmenter_steps=3, seed=seed)  # fmt: skip
    return reproduce_words(cfg, out=out, options=options, quick=quick)
