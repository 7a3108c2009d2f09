"""``potpourri inspect segment-train`` / ``segment-predict``: the multi-class defect segmenter from the command line.

Data for ``segment-train`` (``--data``):

* ``ds-synth:<category>``: DS-Synth generated in memory; train on the photo's training rows, test on its held-out
  rows.
* a Defect Spectrum category folder: ``image/<defect>/NNN.png`` with ``mask/<defect>/NNN_mask.png`` (class ids)
  or ``rbg_mask|rgb_mask/<defect>/NNN_rbg_mask.png`` (palette colours); class names from ``classes.json``.
* a folder with ``images/`` and ``masks/``: class-id PNG masks named ``<stem>.png`` or ``<stem>_mask.png``.

Folders are split into train and test images (``--test-fraction``, seeded).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from potpourri.cli import flags
from potpourri.core.errors import PotpourriError
from potpourri.core.io import write_csv

__all__ = ["SegmentationData", "read_segmentation_data", "register_verbs"]

_LAYOUT_HELP = (
    "expected ds-synth:<category>, a Defect Spectrum category folder (image/<defect>/NNN.png + "
    "mask/<defect>/NNN_mask.png or rbg_mask/), or a folder with images/ and masks/ (class-id PNGs named "
    "<stem>.png or <stem>_mask.png)"
)


@dataclass
class SegmentationData:
    """Train and test arrays at one size, with class names (0 = background) and notes on what was done."""

    train_images: np.ndarray  # (N, S, S, 3) uint8
    train_masks: np.ndarray  # (N, S, S) int64
    test_images: np.ndarray
    test_masks: np.ndarray
    class_names: tuple[str, ...]
    layout: str
    notes: list[str] = field(default_factory=list)


def _resize_pair(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    if image.shape[:2] == (size, size):
        return image, mask
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    mask = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST))
    return image, mask


def _read_pairs(spec: str) -> tuple[list[tuple[np.ndarray, np.ndarray, str]], tuple[str, ...] | None, str]:
    """(image, mask, name) triples of a folder, its class names (None: unknown) and the layout's name."""
    from potpourri.core.imaging import IMAGE_SUFFIXES, read_mask, read_rgb
    from potpourri.data.layouts import DefectSpectrum

    root = Path(spec)
    if not root.is_dir():
        raise PotpourriError(f"--data '{spec}' is not a folder; {_LAYOUT_HELP}")
    if (root / "image").is_dir():
        dataset = DefectSpectrum(root.parent, root.name)
        pairs = []
        for index in range(len(dataset)):
            sample = dataset[index]
            pairs.append((sample.image, sample.mask, f"{sample.path.parent.name}/{sample.path.name}"))
        names = tuple(dataset.class_names) if dataset.class_names else None
        return pairs, names, "defect-spectrum"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise PotpourriError(f"'{root / 'images'}' holds no images; {_LAYOUT_HELP}")
        pairs = []
        for path in images:
            candidates = [root / "masks" / f"{path.stem}{suffix}.png" for suffix in ("", "_mask")]
            mask_path = next((c for c in candidates if c.is_file()), None)
            if mask_path is None:
                raise PotpourriError(f"{path}: no mask (expected {candidates[0]} or {candidates[1]})")
            image = read_rgb(path)
            pairs.append(
                (image, read_mask(mask_path, shape=image.shape[:2], image_path=path, eight_bit=True), path.name)
            )
        return pairs, None, "images+masks"
    raise PotpourriError(f"'{root}' has no image/ nor images/ + masks/ folders; {_LAYOUT_HELP}")


def read_segmentation_data(
    spec: str, *, image_size: int, per_kind: int = 10, test_fraction: float = 0.2, seed: int = 0
) -> SegmentationData:
    """Read ``--data`` into train/test arrays at ``image_size`` (see the module docstring for the layouts)."""
    from potpourri.data.synth import CATEGORIES, CLASSES, DEFECTS, MULTI, make_samples

    if spec.startswith("ds-synth:"):
        category = spec.split(":", 1)[1]
        if category not in CATEGORIES:
            raise PotpourriError(f"unknown DS-Synth category '{category}'; choose from {', '.join(CATEGORIES)}")
        kinds = (*DEFECTS, MULTI)
        gen = {"size": image_size, "kinds": kinds}
        train = make_samples(category, "train", per_kind * len(kinds), **gen)
        train += make_samples(category, "train", per_kind, size=image_size, kinds=("good",))
        test = make_samples(category, "test", max(2, per_kind // 2) * len(kinds), **gen)
        return SegmentationData(
            np.stack([s.image for s in train]),
            np.stack([s.mask for s in train]).astype(np.int64),
            np.stack([s.image for s in test]),
            np.stack([s.mask for s in test]).astype(np.int64),
            CLASSES,
            "ds-synth",
            [f"DS-Synth {category}: train from the photo's training rows, test from its held-out rows"],
        )
    pairs, names, layout = _read_pairs(spec)
    notes = []
    sizes = {p[0].shape[:2] for p in pairs}
    if sizes != {(image_size, image_size)}:
        notes.append(f"images resized to {image_size}x{image_size} (found sizes {sorted(sizes)[:3]})")
    resized = [_resize_pair(image, mask, image_size) for image, mask, _ in pairs]
    images = np.stack([r[0] for r in resized])
    masks = np.stack([r[1] for r in resized]).astype(np.int64)
    if names is None:
        top = int(masks.max())
        names = ("background", *(f"class_{k}" for k in range(1, max(top, 1) + 1)))
        notes.append(f"no classes.json: classes named by id (0..{len(names) - 1})")
    if len(images) < 2:
        raise PotpourriError(f"'{spec}' holds {len(images)} image; need at least 2 (one to train, one to test)")
    order = np.random.default_rng(seed).permutation(len(images))
    n_test = min(len(images) - 1, max(1, round(test_fraction * len(images))))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    notes.append(f"{len(train)} train / {len(test)} test images (seeded split, --test-fraction {test_fraction})")
    return SegmentationData(images[train], masks[train], images[test], masks[test], tuple(names), layout, notes)


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from potpourri.core.runs import new_run, seed_everything
    from potpourri.report.html import Report
    from potpourri.segment.segmenter import SegmenterConfig, segmentation_panels_png, train_segmenter

    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    data = read_segmentation_data(
        args.data, image_size=args.image_size, per_kind=args.per_kind, test_fraction=args.test_fraction, seed=args.seed
    )
    steps = args.steps
    if args.epochs is not None:
        steps = max(1, math.ceil(args.epochs * len(data.train_images) / args.batch_size))
    config = SegmenterConfig(
        class_names=data.class_names,
        image_size=args.image_size,
        encoder=args.encoder,
        tune_blocks=tuple(args.tune_blocks or ()),
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        encoder_lr=args.encoder_lr,
        dice_weight=args.dice_weight,
        seed=args.seed,
    )
    run = new_run(
        "segment", args.out, config={"verb": "inspect segment-train", "data": args.data, **vars(config)}, seed=args.seed
    )
    segmenter = train_segmenter(data.train_images, data.train_masks, config)
    for row in segmenter.history:
        run.log_metrics(row)
    metrics = segmenter.evaluate(data.test_images, data.test_masks)
    latency = segmenter.latency_ms(threads=1)
    segmenter.notes = data.notes + segmenter.notes
    segmenter.metrics.update(test=metrics, latency=latency)
    segmenter.save(run.path)
    summary = {
        "layout": data.layout,
        "train_images": len(data.train_images),
        "test_images": len(data.test_images),
        "steps": steps,
        "train_s": round(segmenter.metrics["train_s"], 2),
        "trainable_parameters": segmenter.trainable_parameters(),
        "test": metrics,
        "latency": latency,
        "notes": segmenter.notes,
    }
    run.write_summary(summary)

    report = Report(f"potpourri inspect segment-train on {args.data}")
    report.section(
        "Summary",
        f"EfficientNet-Lite0 encoder ({config.encoder}) + UNet decoder, {len(data.train_images)} training images at "
        f"{config.image_size} px, {steps} AdamW steps; test on {len(data.test_images)} images.",
    )
    report.table(
        [
            {"quantity": "mIoU (all classes)", "value": metrics["miou"]},
            {"quantity": "mIoU (defect classes)", "value": metrics["miou_defects"]},
            {"quantity": "pixel accuracy", "value": metrics["pixel_accuracy"]},
            {"quantity": "CPU latency ms/image (1 thread, batch 1)", "value": latency["ms_per_image"]},
            {"quantity": "training s", "value": summary["train_s"]},
        ]
    )
    report.section("Per-class IoU (test)", "NaN: the class occurs neither in the truth nor in the predictions.")
    report.table([{"class": k, "IoU": v} for k, v in metrics["per_class_iou"].items()])
    shown = np.arange(min(8, len(data.test_images)))
    predictions = segmenter.predict(data.test_images[shown])
    panel = segmentation_panels_png(
        data.test_images[shown], predictions, run.images / "test_panels.png", truth=data.test_masks[shown]
    )
    report.section("Test images", "image | ground truth | prediction (Defect Spectrum palette)")
    report.image(panel)
    for note in segmenter.notes:
        report.text(note, note=True)
    report.write(run.path / "report.html")
    print(
        f"trained on {len(data.train_images)} images in {summary['train_s']:.1f} s: test mIoU {metrics['miou']:.3f} "
        f"(defects {metrics['miou_defects']:.3f}), {latency['ms_per_image']:.1f} ms/image on 1 thread"
    )
    for note in segmenter.notes:
        print(f"note: {note}")
    print(f"run: {run.path}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from potpourri.core.imaging import find_images, read_rgb
    from potpourri.core.runs import new_run
    from potpourri.report.html import Report
    from potpourri.segment.segmenter import Segmenter, colour_mask, segmentation_panels_png

    if args.threads:
        torch.set_num_threads(args.threads)
    segmenter = Segmenter.load(args.run)
    paths = find_images(args.images)
    run = new_run(
        "predict",
        args.out,
        root=args.run,
        config={"verb": "inspect segment-predict", "run": args.run, "images": [str(p) for p in paths]},
    )
    masks_dir = run.path / "masks"
    masks_dir.mkdir(exist_ok=True)
    names = segmenter.config.class_names
    rows, images, predictions = [], [], []
    start = time.perf_counter()
    for index, path in enumerate(paths):
        image = read_rgb(path)
        pred = segmenter.predict(image[None])[0]  # at the image's own size
        stem = f"{index:03d}_{path.stem}"
        Image.fromarray(pred.astype(np.uint8)).save(masks_dir / f"{stem}_mask.png")
        Image.fromarray(colour_mask(pred)).save(masks_dir / f"{stem}_rgb_mask.png")
        counts = np.bincount(pred.ravel(), minlength=len(names))
        rows.append(
            {
                "image": str(path),
                "width": image.shape[1],
                "height": image.shape[0],
                "defect_fraction": float((pred > 0).mean()),
                "classes": ";".join(f"{names[k]}:{int(counts[k])}" for k in range(1, len(names)) if counts[k]),
                "mask": f"masks/{stem}_mask.png",
            }
        )
        if len(images) < 12:
            small = segmenter.config.image_size
            images.append(np.asarray(Image.fromarray(image).resize((small, small), Image.Resampling.BICUBIC)))
            shrunk = Image.fromarray(pred.astype(np.uint8)).resize((small, small), Image.Resampling.NEAREST)
            predictions.append(np.asarray(shrunk).astype(np.int64))
    seconds = time.perf_counter() - start
    write_csv(run.path / "predictions.csv", rows)
    run.write_summary({"images": len(paths), "images_per_s": len(paths) / seconds, "rows": rows})
    report = Report(f"potpourri inspect segment-predict: {len(paths)} images")
    report.section("Model", f"run {args.run}; classes {', '.join(names)}")
    report.table([{k: r[k] for k in ("image", "defect_fraction", "classes")} for r in rows])
    report.section("Predictions", "image | prediction (Defect Spectrum palette); the first 12 images")
    report.image(segmentation_panels_png(np.stack(images), np.stack(predictions), run.images / "panels.png"))
    report.write(run.path / "report.html")
    for row in rows:
        print(f"{row['image']}: defect fraction {row['defect_fraction']:.4f} {row['classes']}")
    print(f"report: {run.path / 'report.html'}")
    return 0


def _register_segmenter(verbs: argparse._SubParsersAction) -> None:
    """Add ``segment-train`` and ``segment-predict`` to ``potpourri inspect``."""
    from potpourri.segment.segmenter import ENCODER_POLICIES

    train = verbs.add_parser("segment-train", help="train the multi-class defect segmenter; test mIoU, report.html")
    train.add_argument("--data", required=True, help="ds-synth:CATEGORY, a Defect Spectrum category folder or DIR")
    train.add_argument("--out", help="run folder (default runs/segment/vN)")
    train.add_argument("--encoder", choices=ENCODER_POLICIES, default="frozen")
    train.add_argument("--tune-blocks", nargs="+", help="partial: encoder blocks that train, e.g. blocks.4.0")
    train.add_argument("--epochs", type=float, default=None, help="passes over the training set (overrides --steps)")
    train.add_argument("--steps", type=int, default=400, help="AdamW steps")
    train.add_argument("--image-size", type=int, default=96)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=2e-3, help="decoder learning rate")
    train.add_argument("--encoder-lr", type=float, default=2e-4)
    train.add_argument("--dice-weight", type=float, default=0.5)
    train.add_argument("--per-kind", type=int, default=10, help="ds-synth: training images per defect kind")
    train.add_argument("--test-fraction", type=float, default=0.2, help="folders: share of images held out")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None)
    train.set_defaults(func=_cmd_train)

    predict = verbs.add_parser("segment-predict", help="segment images with a trained run: class-id masks, report")
    flags.add_run(predict, "written by `potpourri inspect segment-train`")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    predict.add_argument("--out", help="output folder (default RUN/predict/vN)")
    predict.add_argument("--threads", type=int, default=None)
    predict.set_defaults(func=_cmd_predict)


def _cmd_oneshot(args: argparse.Namespace) -> int:
    from potpourri.core.imaging import find_images, load_rgb, read_mask
    from potpourri.core.metrics import iou_per_class
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.report.html import Report
    from potpourri.report.plots import image_grid_png
    from potpourri.segment.oneshot import OneShotConfig, OneShotSegmenter
    from potpourri.segment.segmenter import colour_mask

    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    if args.load:
        model = OneShotSegmenter.load(args.load)
    else:
        if not args.support or len(args.support) != len(args.support_mask or []):
            raise PotpourriError("give --support IMG --support-mask MASK pairs (one mask per support image)")
        config = OneShotConfig(
            method=args.method,
            source="stable-diffusion" if args.sd_weights else "efficientnet_lite0",
            image_size=args.image_size,
            steps=args.steps,
            sd_weights=args.sd_weights,
            seed=args.seed,
        )
        model = OneShotSegmenter(config).fit(args.support, args.support_mask)
    paths = find_images(args.images)
    truth = [read_mask(m) for m in args.truth] if args.truth else None
    if truth is not None and len(truth) != len(paths):
        raise PotpourriError(f"{len(truth)} --truth masks for {len(paths)} images; give one per image, in order")
    run = new_run(
        "oneshot",
        args.out,
        config={"verb": "inspect oneshot", **dataclasses.asdict(model.config), "images": paths},
        seed=args.seed,
    )
    model.save(run.path / "model")
    start = time.perf_counter()
    predicted = model.predict(paths)
    seconds = time.perf_counter() - start
    masks_dir = run.path / "masks"
    masks_dir.mkdir(exist_ok=True)
    report = Report(f"potpourri inspect oneshot: {model.config.method} ({model.config.source})")
    report.text(f"classes {model.class_ids}; {len(paths)} images in {seconds:.1f} s", note=True)
    support = np.asarray(load_rgb(args.support[0]).resize((model.config.image_size,) * 2)) if args.support else None
    rows, all_pred, all_true = [], [], []
    for index, (path, mask) in enumerate(zip(paths, predicted, strict=True)):
        original = load_rgb(path)
        full = np.asarray(Image.fromarray(mask).resize(original.size, Image.Resampling.NEAREST))
        Image.fromarray(full).save(masks_dir / f"{index:03d}_{path.stem}_mask.png")
        row = {"image": str(path), **{f"pixels_{c}": int((full == c).sum()) for c in model.class_ids}}
        tiles, captions = [np.asarray(original)], ["query"]
        if support is not None:
            tiles, captions = (
                [np.asarray(Image.fromarray(support).resize(original.size)), *tiles],
                ["support", *captions],
            )
        if truth is not None:
            tiles.append(colour_mask(truth[index]))
            captions.append("truth")
            all_pred.append(full.ravel())
            all_true.append(truth[index].ravel())
        tiles.append(colour_mask(full))
        captions.append("prediction")
        panel = image_grid_png(tiles, captions, run.images / f"{index:03d}_{path.stem}.png", columns=len(tiles))
        report.image(panel, path.name)
        rows.append(row)
    summary: dict[str, Any] = {"images": len(paths), "predict_s": round(seconds, 3), "class_ids": model.class_ids}
    if truth is not None:
        n = max(model.class_ids + [int(t.max()) for t in truth]) + 1
        ious = iou_per_class(np.concatenate(all_pred), np.concatenate(all_true), n)
        summary["iou"] = {str(c): float(ious[c]) for c in range(n) if not np.isnan(ious[c])}
        summary["miou"] = float(np.nanmean(ious))
        report.section("IoU against --truth")
        report.table(
            [{"class": c, "IoU": v} for c, v in summary["iou"].items()] + [{"class": "mean", "IoU": summary["miou"]}]
        )
    write_csv(run.path / "predictions.csv", rows)
    run.write_summary(summary)
    report.section("Predicted pixels per class")
    report.table(rows)
    report.write(run.path / "report.html")
    print(f"segmented {len(paths)} images with {model.config.method} in {seconds:.1f} s")
    if "miou" in summary:
        print(f"mIoU {summary['miou']:.3f}")
    print(f"run: {run.path}")
    return 0


def _register_oneshot(verbs: argparse._SubParsersAction) -> None:
    """Add ``potpourri inspect oneshot``: fit from annotated support images (or --load), segment IMAGES."""
    from potpourri.segment.oneshot import METHODS

    p = verbs.add_parser("oneshot", help="SLiMe-style one-shot segmentation from one (or k) annotated images")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="images (or folders) to segment")
    p.add_argument("--support", action="append", help="an annotated image (repeat for k-shot)")
    p.add_argument("--support-mask", action="append", help="its class-index PNG mask, 0 = background (repeat)")
    p.add_argument("--truth", action="append", help="optional class-index mask of each IMAGE, in order (for IoU)")
    p.add_argument("--method", choices=METHODS, default="slime")
    p.add_argument("--load", help="a model folder saved by an earlier run (RUN/model) instead of --support")
    p.add_argument("--sd-weights", help="Stable Diffusion 2.1-base folder (diffusers format); default: Lite0 features")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", help="run folder (default runs/oneshot/vN)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_oneshot)


def register_verbs(verbs: argparse._SubParsersAction) -> None:
    """Add the segmentation verbs (``oneshot``, ``segment-train``, ``segment-predict``) to ``potpourri inspect``."""
    _register_oneshot(verbs)
    _register_segmenter(verbs)
