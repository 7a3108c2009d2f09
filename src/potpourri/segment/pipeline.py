"""The segmentation pipelines behind ``potpourri inspect segment-train``, ``segment-predict`` and ``oneshot``:
read data, train or load, predict, write the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from potpourri.core.errors import PotpourriError
from potpourri.core.io import write_csv
from potpourri.core.runs import Run
from potpourri.data.segmentation import read_segmentation_data


def train_segmenter_run(
    *,
    batch_size: int,
    data_spec: str,
    dice_weight: float,
    encoder: str,
    encoder_lr: float,
    epochs: float | None,
    image_size: int | None,
    lr: float,
    out: str | None,
    per_kind: int,
    seed: int,
    steps: int,
    test_fraction: float,
    threads: int | None,
    tune_blocks: list[str] | None,
    device: str = "auto",
    precision: str = "fp32",
    resume: bool = False,
    checkpoint_every: int = 0,
    progress: bool = True,
    sync_bn: bool = False,
) -> Run | None:
    """``potpourri inspect segment-train``: train the multi-class defect segmenter on ``data_spec``; test mIoU,
    latency and report.html in the returned run. Checkpoints go to ``RUN/checkpoints`` (every ``checkpoint_every``
    steps and at the end); ``resume`` continues the run in ``out`` from the last one. Under torchrun every process
    trains on its slice of each batch (``sync_bn``: BatchNorm statistics of the global batch); rank 0 makes the run,
    writes the checkpoints, evaluates, reports and returns the run (the other processes return None)."""
    import torch

    from potpourri.core.distributed import process_group
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.core.training import TrainOptions
    from potpourri.report.html import Report
    from potpourri.segment.segmenter import SegmenterConfig, segmentation_panels_png, train_segmenter

    if resume and not out:
        raise PotpourriError("--resume needs --out DIR, the folder of the run to continue")
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    data = read_segmentation_data(
        data_spec, image_size=image_size, per_kind=per_kind, test_fraction=test_fraction, seed=seed
    )
    if epochs is not None:
        steps = max(1, math.ceil(epochs * len(data.train_images) / batch_size))
    config = SegmenterConfig(
        class_names=data.class_names,
        image_size=image_size,
        encoder=encoder,
        tune_blocks=tuple(tune_blocks or ()),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        encoder_lr=encoder_lr,
        dice_weight=dice_weight,
        seed=seed,
    )
    with process_group(device) as group:  # rank 0 of 1 outside torchrun
        run = group.main_first(lambda: new_run(
            "segment", out, config={"verb": "inspect segment-train", "data": data_spec, **vars(config)}, seed=seed
        ))  # fmt: skip
        options = TrainOptions(device=device, precision=precision, resume=resume, progress=progress and group.is_main,
                               checkpoint_every=checkpoint_every, sync_bn=sync_bn)  # fmt: skip
        segmenter = train_segmenter(
            data.train_images, data.train_masks, config, options=options, checkpoints=run.path / "checkpoints"
        )
    if not group.is_main:  # rank 0 evaluates and writes the run
        return None
    for row in segmenter.history:
        run.log_metrics(row)
    metrics = segmenter.evaluate(data.test_images, data.test_masks, device=device, precision=precision)
    latency = segmenter.latency_ms(threads=1)
    segmenter.notes = data.notes + segmenter.notes
    segmenter.metrics.update(test=metrics, latency=latency)
    segmenter.save(run.path)
    from potpourri.core.runs import write_run_metadata
    from potpourri.segment.segmenter import CONFIG_FILE

    write_run_metadata(run.path, kind="segmenter", files={"config": CONFIG_FILE}, classes=segmenter.config.class_names,
                       image_size=segmenter.config.image_size)  # fmt: skip
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

    report = Report(f"potpourri inspect segment-train on {data_spec}")
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
    predictions = segmenter.predict(data.test_images[shown], device=device, precision=precision)
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
    return run


def predict_segmenter_run(
    *,
    image_paths: list[str],
    out: str | None,
    run_dir: str,
    threads: int | None,
    device: str = "auto",
    precision: str = "fp32",
) -> Run:
    """``potpourri inspect segment-predict``: class-id masks, panels, ``predictions.csv`` and a report for
    ``image_paths`` from a trained segmenter run, computed on ``device`` in ``precision``."""
    import torch

    from potpourri.core.distributed import join, rows_in_parts
    from potpourri.core.imaging import find_images, read_rgb
    from potpourri.core.runs import new_run
    from potpourri.core.training import resolve_device
    from potpourri.report.html import Report
    from potpourri.segment.segmenter import Segmenter, colour_mask, segmentation_panels_png

    if threads:
        torch.set_num_threads(threads)
    segmenter = Segmenter.load(run_dir)
    paths = find_images(image_paths)
    names = segmenter.config.class_names
    group = join(resolve_device(device))  # torchrun: each process predicts its block of files, rank 0 merges
    try:
        run = group.main_first(lambda: new_run(
            "predict", out, root=run_dir,
            config={"verb": "inspect segment-predict", "run": run_dir, "images": [str(p) for p in paths]},
        ))  # fmt: skip
        (run.path / "masks").mkdir(exist_ok=True)

        def score(first: int, stop: int) -> list[dict]:
            rows = []
            for index, path in zip(range(first, stop), paths[first:stop], strict=True):
                image = read_rgb(path)
                pred = segmenter.predict(image[None], device=device, precision=precision)[0]  # at the image's size
                stem = f"{index:03d}_{path.stem}"
                Image.fromarray(pred.astype(np.uint8)).save(run.path / "masks" / f"{stem}_mask.png")
                Image.fromarray(colour_mask(pred)).save(run.path / "masks" / f"{stem}_rgb_mask.png")
                counts = np.bincount(pred.ravel(), minlength=len(names))
                rows.append({
                    "image": str(path), "width": image.shape[1], "height": image.shape[0],
                    "defect_fraction": float((pred > 0).mean()),
                    "classes": ";".join(f"{names[k]}:{int(counts[k])}" for k in range(1, len(names)) if counts[k]),
                    "mask": f"masks/{stem}_mask.png",
                })  # fmt: skip
            return rows

        start = time.perf_counter()
        fields = ["image", "width", "height", "defect_fraction", "classes", "mask"]
        table = rows_in_parts(group, run.path / "predictions.csv", [str(p) for p in paths], score, batch_size=1,
                              fieldnames=fields)  # fmt: skip
        seconds = time.perf_counter() - start
    finally:
        group.destroy()
    if not group.is_main:  # rank 0 writes the summary and report
        group.after_main_writes()
        return run
    rows = [{**r, "width": int(r["width"]), "height": int(r["height"]), "defect_fraction": float(r["defect_fraction"])}
            for r in table]  # fmt: skip
    run.write_summary({"images": len(paths), "images_per_s": len(paths) / seconds, "rows": rows})
    images, predictions = [], []
    small = segmenter.config.image_size
    for row in rows[:12]:  # the panels: from the written masks, whichever process predicted them
        image = Image.fromarray(read_rgb(row["image"])).resize((small, small), Image.Resampling.BICUBIC)
        with Image.open(run.path / row["mask"]) as mask:
            shrunk = mask.resize((small, small), Image.Resampling.NEAREST)
        images.append(np.asarray(image))
        predictions.append(np.asarray(shrunk).astype(np.int64))
    report = Report(f"potpourri inspect segment-predict: {len(paths)} images")
    report.section("Model", f"run {run_dir}; classes {', '.join(names)}")
    report.table([{k: r[k] for k in ("image", "defect_fraction", "classes")} for r in rows])
    report.section("Predictions", "image | prediction (Defect Spectrum palette); the first 12 images")
    report.image(segmentation_panels_png(np.stack(images), np.stack(predictions), run.images / "panels.png"))
    report.write(run.path / "report.html")
    for row in rows:
        print(f"{row['image']}: defect fraction {row['defect_fraction']:.4f} {row['classes']}")
    print(f"report: {run.path / 'report.html'}")
    group.after_main_writes()
    return run


def oneshot_run(
    *,
    image_size: int | None,
    images: list[str],
    load: str | None,
    method: str,
    out: str | None,
    sd_weights: str | None,
    seed: int,
    steps: int,
    support_images: list[str] | None,
    support_mask: list[str] | None,
    threads: int | None,
    truth_masks: list[str] | None,
    device: str = "auto",
    precision: str = "fp32",
    resume: bool = False,
    checkpoint_every: int = 0,
    progress: bool = True,
) -> Run:
    """``potpourri inspect oneshot``: fit a one-shot segmenter on support images (or load one) and segment
    ``images`` on ``device`` in ``precision``; masks, panels, ``predictions.csv`` and, with ``truth_masks``, IoU.
    With ``out`` the fit checkpoints to ``OUT/checkpoints`` and ``resume`` continues it from there."""

    from potpourri.core.imaging import find_images, load_rgb, read_mask
    from potpourri.core.metrics import iou_per_class
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.core.training import TrainOptions
    from potpourri.report.html import Report
    from potpourri.report.plots import image_grid_png
    from potpourri.segment.oneshot import OneShotConfig, OneShotSegmenter
    from potpourri.segment.segmenter import colour_mask

    if threads:
        torch.set_num_threads(threads)
    if resume and (load or not out):
        raise PotpourriError("--resume continues a fit in --out DIR; give --out (and --support, not --load)")
    seed_everything(seed)
    if load:
        model = OneShotSegmenter.load(load)
    else:
        if not support_images or len(support_images) != len(support_mask or []):
            raise PotpourriError("give --support IMG --support-mask MASK pairs (one mask per support image)")
        config = OneShotConfig(
            method=method,
            source="stable-diffusion" if sd_weights else "efficientnet_lite0",
            image_size=image_size,
            steps=steps,
            sd_weights=sd_weights,
            seed=seed,
        )
        options = TrainOptions(
            device=device, precision=precision, resume=resume, progress=progress, checkpoint_every=checkpoint_every
        )
        checkpoints = Path(out) / "checkpoints" if out else None  # without --out the run folder is not known yet
        model = OneShotSegmenter(config).fit(support_images, support_mask, options=options, checkpoints=checkpoints)
    paths = find_images(images)
    truth = [read_mask(m) for m in truth_masks] if truth_masks else None
    if truth is not None and len(truth) != len(paths):
        raise PotpourriError(f"{len(truth)} --truth masks for {len(paths)} images; give one per image, in order")
    run = new_run(
        "oneshot",
        out,
        config={"verb": "inspect oneshot", **dataclasses.asdict(model.config), "images": paths},
        seed=seed,
    )
    model.save(run.path / "model")
    start = time.perf_counter()
    predicted = model.predict(paths, device=device, precision=precision)
    seconds = time.perf_counter() - start
    masks_dir = run.path / "masks"
    masks_dir.mkdir(exist_ok=True)
    report = Report(f"potpourri inspect oneshot: {model.config.method} ({model.config.source})")
    report.text(f"classes {model.class_ids}; {len(paths)} images in {seconds:.1f} s", note=True)
    support = np.asarray(load_rgb(support_images[0]).resize((model.config.image_size,) * 2)) if support_images else None
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
    return run
