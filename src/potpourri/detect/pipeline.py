"""The detection pipelines behind ``potpourri detect train / predict / eval / mask-train``: read data, train or
load a detector, evaluate, draw, write the run folder.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from potpourri.core.errors import PotpourriError
from potpourri.core.runs import Run

PREDICTION_FIELDS = ("image", "class", "score", "x1", "y1", "x2", "y2")  # detect predict: one row per box
MASK_CHECKPOINT_EVERY = 100  # mask-train steps between checkpoints (the detector trains checkpoint once per epoch)


def train_run(
    *,
    assigner: str,
    backbone_pretrained: bool,
    batch_size: int,
    cls_loss: str,
    conf: float,
    data_spec: str,
    device: str = "auto",
    epochs: int,
    eval_every: int,
    image_size: int | None,
    lr: float,
    model_name: str,
    optimizer: str,
    out: str | None,
    per_kind: int,
    precision: str = "fp32",
    resume: bool,
    seed: int,
    test_fraction: float,
    threads: int | None,
    atss_warmup_epochs: int = 0,
    detector_options: dict[str, Any] | None = None,
    sync_bn: bool = False,
) -> Run | None:
    """``potpourri detect train``: train a registered detector on ``data_spec`` (resumable with ``resume`` and
    ``out``) on ``device`` in ``precision``; test mAP and report. ``detector_options``: ``neck``, ``sppf``, ``aat``.
    Under torchrun each process trains on its slice of every batch (``sync_bn``: BatchNorm statistics of the global
    batch); rank 0 makes and writes the run and returns it, the other processes return None."""
    import torch

    from potpourri.core.distributed import process_group
    from potpourri.core.runs import new_run
    from potpourri.core.training import TrainOptions
    from potpourri.data.boxes import read_detection_data
    from potpourri.detect.train import (
        DetectTrainConfig,
        evaluate_detector,
        model_options,
        save_detector,
        train_detector,
    )
    from potpourri.report.html import Report

    if threads:
        torch.set_num_threads(threads)
    if resume and out is None:
        raise PotpourriError("--resume continues the run in --out; pass --out RUN_FOLDER")
    if image_size % 32:
        raise PotpourriError(f"--image-size {image_size} must be a multiple of 32 (e.g. 256 or 320)")
    data = read_detection_data(
        data_spec, image_size=image_size, per_kind=per_kind, test_fraction=test_fraction, seed=seed
    )
    config = DetectTrainConfig(
        model=model_name,
        class_names=data.class_names,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        optimizer=optimizer,
        cls_loss=cls_loss,
        assigner=assigner,
        atss_warmup_epochs=atss_warmup_epochs,
        **(detector_options or {}),
        backbone_pretrained=backbone_pretrained,
        eval_every=eval_every,
        seed=seed,
    )
    record = {"verb": "detect train", "data": data_spec, **vars(config), "device": device, "precision": precision}
    with process_group(device) as group:  # rank 0 of 1 outside torchrun
        run = group.main_first(lambda: new_run("detect", out, config=record, seed=seed))
        # a checkpoint once per epoch (train_detector's default)
        options = TrainOptions(
            device=device, precision=precision, resume=resume, progress=group.is_main, sync_bn=sync_bn
        )
        result = train_detector(data.train, data.test, config, run_path=run.path, options=options)
    if not group.is_main:  # rank 0 evaluates and writes the run
        return None
    columns = list(dict.fromkeys(k for row in result.history for k in row))  # test mAP appears only on eval epochs
    for row in result.history:
        run.log_metrics({k: row.get(k, "") for k in columns})
    model = result.model
    meta = {"model": model_name, "class_names": list(data.class_names), "image_size": image_size,
            "data": data_spec, "layout": data.layout, "model_options": model_options(config)}  # fmt: skip
    save_detector(run.path, model, meta)
    from potpourri.core.runs import write_run_metadata

    write_run_metadata(run.path, kind="detector", files={"model": "detector.safetensors", "config": "detector.json"},
                       model=model_name, classes=list(data.class_names), image_size=image_size)  # fmt: skip
    metrics = evaluate_detector(model, data.test, image_size=image_size, precision=precision)  # where it trained
    shown = data.test[: min(8, len(data.test))]
    fused, parity = _reparam_check(model, [s.image for s in shown], image_size)
    fused_metrics = evaluate_detector(fused, data.test, image_size=image_size, precision=precision)
    summary = {
        "layout": data.layout,
        "train_images": len(data.train),
        "test_images": len(data.test),
        "train_boxes": int(sum(len(s.labels) for s in data.train)),
        "test_boxes": metrics["boxes"],
        "epochs": epochs,
        "assigner": assigner,
        "steps": result.steps,
        "train_s": round(result.seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
        "params_reparam": sum(p.numel() for p in fused.parameters()),
        "test_map50": metrics["map50"],
        "test_map": metrics["map"],
        "per_class_ap50": dict(zip(data.class_names, metrics["per_class_ap50"], strict=True)),
        "reparam_max_abs_diff": parity,
        "reparam_test_map50": fused_metrics["map50"],
        "notes": data.notes,
    }
    run.write_summary(summary)

    from potpourri.detect.train import detect_images

    found = detect_images(fused, [s.image for s in shown], image_size=image_size, conf=conf, precision=precision)
    truth = [draw_detections(s.image, {"boxes": s.boxes, "scores": np.ones(len(s.labels)), "labels": s.labels},
                             data.class_names) for s in shown]  # fmt: skip
    predicted = [draw_detections(s.image, d, data.class_names) for s, d in zip(shown, found, strict=True)]
    panel = _grid_png([im for pair in zip(truth, predicted, strict=True) for im in pair], run.images / "test.png")
    report = Report(f"potpourri detect train on {data_spec}")
    report.section(
        "Summary",
        f"{model_name} ({assigner} assigner), {len(data.train)} training images at {image_size} px, "
        f"{result.steps} steps "
        f"({epochs} epochs) in {summary['train_s']} s; test on {len(data.test)} images.",
    )
    report.table(
        [
            {"quantity": "test mAP@0.5", "value": metrics["map50"]},
            {"quantity": "test mAP@0.5:0.95", "value": metrics["map"]},
            {"quantity": "re-parameterised: max |Δ| raw outputs", "value": parity},
            {"quantity": "re-parameterised: test mAP@0.5", "value": fused_metrics["map50"]},
            {"quantity": "parameters (train / deploy)", "value": f"{summary['params']} / {summary['params_reparam']}"},
        ]
    )
    report.section("Per-class AP@0.5 (test)", "NaN: the class has no test box.")
    report.table([{"class": k, "AP@0.5": v} for k, v in summary["per_class_ap50"].items()])
    report.section("Test images", f"pairs: ground truth | prediction (confidence ≥ {conf})")
    report.image(panel)
    for note in data.notes:
        report.text(note, note=True)
    report.write(run.path / "report.html")
    print(
        f"trained {model_name} on {len(data.train)} images in {summary['train_s']} s: test mAP@0.5 "
        f"{metrics['map50']:.3f}, mAP@0.5:0.95 {metrics['map']:.3f}; re-parameterised max |diff| {parity:.2e}"
    )
    print(f"run: {run.path}")
    return run


def predict_run(
    *,
    conf: float,
    device: str = "auto",
    images: list[str],
    iou: float,
    no_reparam: bool,
    out: str | None,
    precision: str = "fp32",
    resume: bool = False,
    run_dir: str,
    threads: int | None,
) -> Run:
    """``potpourri detect predict``: boxes for ``images`` from a trained run on ``device`` in ``precision``; drawn
    images and ``predictions.csv`` (one row per box), written image by image so ``resume`` continues a killed run in
    ``out``. Under torchrun each process predicts its block of the files and rank 0 merges the rows."""
    import torch
    import yaml
    from PIL import Image

    from potpourri.core.distributed import join, rows_in_parts
    from potpourri.core.imaging import find_images, read_rgb
    from potpourri.core.runs import new_run
    from potpourri.core.training import resolve_device
    from potpourri.detect.train import detect_images

    if resume and out is None:
        raise PotpourriError("--resume continues the predict in --out; pass --out DIR of an earlier `detect predict`")
    if threads:
        torch.set_num_threads(threads)
    model, meta = _load(run_dir, not no_reparam)
    names = tuple(meta["class_names"])
    paths = find_images(images)
    group = join(resolve_device(device))  # torchrun: each process predicts its block of files, rank 0 merges
    config = {"verb": "detect predict", "run": run_dir, "images": [str(p) for p in paths], "conf": conf, "iou": iou,
              "world_size": group.world}  # fmt: skip

    def open_run() -> Run:
        if not resume:
            return new_run("predict", out, root=run_dir, config=config)
        if out is None or not (Path(out) / "config.yaml").is_file():
            raise PotpourriError("--resume needs --out DIR of an earlier `detect predict`")
        before = yaml.safe_load((Path(out) / "config.yaml").read_text())
        if {k: before.get(k, 1 if k == "world_size" else None) for k in config} != config:
            raise PotpourriError(
                f"'{out}' predicted other images, another run, --conf/--iou or number of processes; start a new --out"
            )
        return Run(Path(out))

    counted = [0]  # images this process predicted (a resumed run skips some)

    def score(first: int, stop: int) -> list[dict]:
        rows = []
        for index, path in zip(range(first, stop), paths[first:stop], strict=True):
            counted[0] += 1
            image = read_rgb(path)
            (found,) = detect_images(model, [image], image_size=meta["image_size"], conf=conf, iou=iou, device=device,
                                     precision=precision)  # fmt: skip
            Image.fromarray(draw_detections(image, found, names)).save(run.images / f"{index:03d}_{path.stem}.png")
            for box, score, label in zip(found["boxes"], found["scores"], found["labels"], strict=True):
                corners = {k: round(float(v), 1) for k, v in zip(("x1", "y1", "x2", "y2"), box, strict=True)}
                rows.append({"image": str(path), "class": names[int(label)], "score": round(float(score), 4),
                             **corners})  # fmt: skip
            print(f"{path}: {len(found['scores'])} boxes " + ", ".join(f"{names[int(c)]}" for c in found["labels"]))
        return rows

    try:
        run = group.main_first(open_run)
        start = time.perf_counter()
        rows = rows_in_parts(group, run.path / "predictions.csv", [str(p) for p in paths], score, batch_size=1,
                             fieldnames=list(PREDICTION_FIELDS), many=True)  # fmt: skip
        seconds = time.perf_counter() - start
    finally:
        group.destroy()
    if not group.is_main:  # rank 0 writes the summary
        group.after_main_writes()
        return run
    scored = counted[0] * group.world  # rank 0's block is about 1/world of the job
    run.write_summary({"images": len(paths), "boxes": len(rows),
                       "images_per_s": scored / seconds if seconds > 0 and scored else None})  # fmt: skip
    print(f"predictions: {run.path / 'predictions.csv'}; images with boxes: {run.images}")
    group.after_main_writes()
    return run


def eval_run(
    *,
    data_spec: str,
    device: str = "auto",
    out: str | None,
    per_kind: int,
    precision: str = "fp32",
    reparam: bool,
    run_dir: str,
    seed: int,
    split: str,
    test_fraction: float,
    threads: int | None,
) -> Run:
    """``potpourri detect eval``: mAP of a trained run on ``data_spec`` (optionally re-parameterised first), run on
    ``device`` in ``precision``."""
    import torch

    from potpourri.core.runs import new_run
    from potpourri.data.boxes import read_detection_data
    from potpourri.detect.train import evaluate_detector

    if threads:
        torch.set_num_threads(threads)
    model, meta = _load(run_dir, reparam)
    data = read_detection_data(data_spec, image_size=meta["image_size"], per_kind=per_kind,
                               test_fraction=test_fraction, seed=seed)  # fmt: skip
    if tuple(data.class_names) != tuple(meta["class_names"]):
        raise PotpourriError(
            f"--data has classes {list(data.class_names)} but the detector knows {meta['class_names']}; evaluate on "
            "data with the same classes"
        )
    samples = data.test if split == "test" else data.train + data.test
    metrics = evaluate_detector(model, samples, image_size=meta["image_size"], device=device, precision=precision)
    run = new_run("eval", out, root=run_dir)
    run.write_config({"verb": "detect eval", "run": run_dir, "data": data_spec, "split": split,
                      "reparam": reparam})  # fmt: skip
    run.write_summary(
        {**metrics, "per_class_ap50": dict(zip(meta["class_names"], metrics["per_class_ap50"], strict=True))}
    )
    print(
        f"{split} ({metrics['images']} images, {metrics['boxes']} boxes): mAP@0.5 {metrics['map50']:.4f}, "
        f"mAP@0.5:0.95 {metrics['map']:.4f}"
    )
    return run


def mask_train_run(
    *,
    data: str,
    device: str = "auto",
    lr: float,
    out: str | None,
    per_kind: int,
    precision: str = "fp32",
    resume: bool = False,
    run_dir: str,
    seconds: float,
    seed: int,
    steps: int,
    threads: int | None,
) -> Run:
    """``potpourri detect mask-train``: train the Mask Frozen-DETR-style mask head on a frozen detector run, on
    ``device`` in ``precision`` (resumable with ``resume`` and ``out``)."""
    import torch

    from potpourri.core.runs import new_run
    from potpourri.core.training import TrainOptions
    from potpourri.detect.mask_head import (
        MaskHeadConfig,
        mask_coco_map,
        predict_instances,
        read_instance_data,
        save_mask_head,
        train_mask_head,
    )
    from potpourri.detect.train import load_detector

    if threads:
        torch.set_num_threads(threads)
    if resume and out is None:
        raise PotpourriError("--resume continues the run in --out; pass --out MASK_RUN_FOLDER")
    detector, meta = load_detector(run_dir)
    train, test, names = read_instance_data(data, image_size=meta["image_size"], per_kind=per_kind,
                                            seed=seed)  # fmt: skip
    if tuple(names) != tuple(meta["class_names"]):
        raise PotpourriError(f"--data has classes {list(names)} but the detector knows {meta['class_names']}")
    cfg = MaskHeadConfig(max_steps=steps, max_seconds=seconds, lr=lr, seed=seed)
    run = new_run("mask", out, root=run_dir)
    run.write_config({"verb": "detect mask-train", "run": run_dir, "data": data, "steps": steps,
                      "seconds": seconds, "lr": lr, "seed": seed, "device": device,
                      "precision": precision})  # fmt: skip
    run.write_env(seed)
    options = TrainOptions(device=device, precision=precision, resume=resume, checkpoint_every=MASK_CHECKPOINT_EVERY)
    head, history = train_mask_head(detector, train, cfg, options=options, checkpoints=run.path / "checkpoints")
    save_mask_head(run.path, head, {"detector_run": str(run_dir), "data": data})
    found = predict_instances(detector, head, [s.image for s in test], conf=0.001, precision=precision)
    metrics = mask_coco_map(found, test, len(names))
    run.write_summary({**metrics, **{k: v for k, v in history.items() if k != "losses"},
                       "last_loss": history["losses"][-1] if history["losses"] else None})  # fmt: skip
    print(
        f"mask head: {history['steps']} steps in {history['train_s']:.0f}s ({history['trainable_params']} trainable "
        f"params, detector frozen); test mask mAP@0.5 {metrics['map50']:.4f}, mAP@0.5:0.95 {metrics['map']:.4f}; "
        f"{run.path}"
    )
    return run


def draw_detections(image: np.ndarray, detections: dict[str, np.ndarray], class_names: tuple[str, ...]) -> np.ndarray:
    """The image with each box outlined in its class colour (Defect Spectrum palette) and labelled with its score."""
    from PIL import Image, ImageDraw

    from potpourri.data.synth import PALETTE

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    for box, score, label in zip(detections["boxes"], detections["scores"], detections["labels"], strict=True):
        colour = PALETTE[1 + int(label) % (len(PALETTE) - 1)]
        draw.rectangle([float(v) for v in box], outline=colour, width=2)
        name = class_names[int(label)] if int(label) < len(class_names) else str(int(label))
        draw.text((float(box[0]) + 2, float(box[1]) + 1), f"{name} {float(score):.2f}", fill=colour)
    return np.asarray(canvas)


def _grid_png(images: list[np.ndarray], path: Path, columns: int = 4) -> Path:
    from PIL import Image

    side = images[0].shape[0]
    rows = -(-len(images) // columns)
    grid = np.full((rows * side, columns * side, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * side : (r + 1) * side, c * side : (c + 1) * side] = image
    Image.fromarray(grid).save(path)
    return path


def _reparam_check(model: Any, images: list[np.ndarray], image_size: int) -> tuple[Any, float]:
    """The re-parameterised copy and the max |Δ| of its raw outputs against the multi-branch model."""
    import torch

    from potpourri.data.transforms import images_to_tensor
    from potpourri.models.reparam import reparameterize

    x = images_to_tensor(images, model.mean, model.std).contiguous().to(next(model.parameters()).device)
    with torch.no_grad():
        before = model.eval()(x)
        fused = reparameterize(model)
        return fused, float((fused(x) - before).abs().max())


def _load(run_dir: str, reparam: bool) -> tuple[Any, dict[str, Any]]:
    from potpourri.detect.train import load_detector
    from potpourri.models.reparam import reparameterize

    model, meta = load_detector(run_dir)
    return (reparameterize(model) if reparam else model), meta
