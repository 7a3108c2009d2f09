"""``potpourri detect train | predict | eval``: the YOLOv6-style defect detector from the command line.

``--data`` is ``ds-synth:<category>`` (boxes from DS-Synth masks; train on the photo's training rows, test on its
held-out rows), a YOLO folder (``images/`` + ``labels/*.txt``) or a COCO json; folders are split into train and test
images with a seed (``--test-fraction``). See ``potpourri.data.boxes`` for the formats and their errors.

Example:
    potpourri detect train --data ds-synth:brick --epochs 20
    potpourri detect train --data ds-synth:brick --epochs 20 --assigner atss   # static ATSS instead of TAL
    potpourri detect predict runs/detect/v0 photo.png --conf 0.3
    potpourri detect eval runs/detect/v0 --data ds-synth:brick --reparam
    potpourri detect mask-train runs/detect/v0 --data ds-synth:brick --seconds 150   # frozen detector + mask head
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from potpourri.cli import flags
from potpourri.core.errors import PotpourriError
from potpourri.core.io import write_csv

__all__ = ["draw_detections", "register"]


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
    from potpourri.deploy.reparam import reparameterize

    x = images_to_tensor(images, model.mean, model.std).contiguous()
    with torch.no_grad():
        before = model.eval()(x)
        fused = reparameterize(model)
        return fused, float((fused(x) - before).abs().max())


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from potpourri.core.runs import new_run
    from potpourri.data.boxes import read_detection_data
    from potpourri.detect.train import DetectTrainConfig, evaluate_detector, save_detector, train_detector
    from potpourri.report.html import Report

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.image_size % 32:
        raise PotpourriError(f"--image-size {args.image_size} must be a multiple of 32 (e.g. 256 or 320)")
    data = read_detection_data(
        args.data, image_size=args.image_size, per_kind=args.per_kind, test_fraction=args.test_fraction, seed=args.seed
    )
    config = DetectTrainConfig(
        model=args.model,
        class_names=data.class_names,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        cls_loss=args.cls_loss,
        assigner=args.assigner,
        backbone_pretrained=args.backbone_pretrained,
        eval_every=args.eval_every,
        seed=args.seed,
    )
    run = new_run(
        "detect", args.out, config={"verb": "detect train", "data": args.data, **vars(config)}, seed=args.seed
    )
    result = train_detector(data.train, data.test, config, run_path=run.path, resume=args.resume)
    columns = list(dict.fromkeys(k for row in result.history for k in row))  # test mAP appears only on eval epochs
    for row in result.history:
        run.log_metrics({k: row.get(k, "") for k in columns})
    model = result.model
    meta = {"model": args.model, "class_names": list(data.class_names), "image_size": args.image_size,
            "data": args.data, "layout": data.layout}  # fmt: skip
    save_detector(run.path, model, meta)
    metrics = evaluate_detector(model, data.test, image_size=args.image_size)
    shown = data.test[: min(8, len(data.test))]
    fused, parity = _reparam_check(model, [s.image for s in shown], args.image_size)
    fused_metrics = evaluate_detector(fused, data.test, image_size=args.image_size)
    summary = {
        "layout": data.layout,
        "train_images": len(data.train),
        "test_images": len(data.test),
        "train_boxes": int(sum(len(s.labels) for s in data.train)),
        "test_boxes": metrics["boxes"],
        "epochs": args.epochs,
        "assigner": args.assigner,
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

    found = detect_images(fused, [s.image for s in shown], image_size=args.image_size, conf=args.conf)
    truth = [draw_detections(s.image, {"boxes": s.boxes, "scores": np.ones(len(s.labels)), "labels": s.labels},
                             data.class_names) for s in shown]  # fmt: skip
    predicted = [draw_detections(s.image, d, data.class_names) for s, d in zip(shown, found, strict=True)]
    panel = _grid_png([im for pair in zip(truth, predicted, strict=True) for im in pair], run.images / "test.png")
    report = Report(f"potpourri detect train on {args.data}")
    report.section(
        "Summary",
        f"{args.model} ({args.assigner} assigner), {len(data.train)} training images at {args.image_size} px, "
        f"{result.steps} steps "
        f"({args.epochs} epochs) in {summary['train_s']} s; test on {len(data.test)} images.",
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
    report.section("Test images", f"pairs: ground truth | prediction (confidence ≥ {args.conf})")
    report.image(panel)
    for note in data.notes:
        report.text(note, note=True)
    report.write(run.path / "report.html")
    print(
        f"trained {args.model} on {len(data.train)} images in {summary['train_s']} s: test mAP@0.5 "
        f"{metrics['map50']:.3f}, mAP@0.5:0.95 {metrics['map']:.3f}; re-parameterised max |diff| {parity:.2e}"
    )
    print(f"run: {run.path}")
    return 0


def _load(run_dir: str, reparam: bool) -> tuple[Any, dict[str, Any]]:
    from potpourri.deploy.reparam import reparameterize
    from potpourri.detect.train import load_detector

    model, meta = load_detector(run_dir)
    return (reparameterize(model) if reparam else model), meta


def _cmd_predict(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    from potpourri.core.imaging import find_images, read_rgb
    from potpourri.core.runs import new_run
    from potpourri.detect.train import detect_images

    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = _load(args.run, not args.no_reparam)
    names = tuple(meta["class_names"])
    paths = find_images(args.images)
    run = new_run("predict", args.out, root=args.run)
    run.write_config({"verb": "detect predict", "run": args.run, "images": [str(p) for p in paths],
                      "conf": args.conf, "iou": args.iou})  # fmt: skip
    run.write_env()
    rows = []
    start = time.perf_counter()
    for index, path in enumerate(paths):
        image = read_rgb(path)
        (found,) = detect_images(model, [image], image_size=meta["image_size"], conf=args.conf, iou=args.iou)
        Image.fromarray(draw_detections(image, found, names)).save(run.images / f"{index:03d}_{path.stem}.png")
        for box, score, label in zip(found["boxes"], found["scores"], found["labels"], strict=True):
            corners = {k: round(float(v), 1) for k, v in zip(("x1", "y1", "x2", "y2"), box, strict=True)}
            rows.append({"image": str(path), "class": names[int(label)], "score": round(float(score), 4), **corners})
        print(f"{path}: {len(found['scores'])} boxes " + ", ".join(f"{names[int(c)]}" for c in found["labels"]))
    seconds = time.perf_counter() - start
    write_csv(run.path / "predictions.csv", rows, fieldnames=["image", "class", "score", "x1", "y1", "x2", "y2"])
    run.write_summary({"images": len(paths), "boxes": len(rows), "images_per_s": len(paths) / seconds})
    print(f"predictions: {run.path / 'predictions.csv'}; images with boxes: {run.images}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from potpourri.core.runs import new_run
    from potpourri.data.boxes import read_detection_data
    from potpourri.detect.train import evaluate_detector

    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = _load(args.run, args.reparam)
    data = read_detection_data(args.data, image_size=meta["image_size"], per_kind=args.per_kind,
                               test_fraction=args.test_fraction, seed=args.seed)  # fmt: skip
    if tuple(data.class_names) != tuple(meta["class_names"]):
        raise PotpourriError(
            f"--data has classes {list(data.class_names)} but the detector knows {meta['class_names']}; evaluate on "
            "data with the same classes"
        )
    samples = data.test if args.split == "test" else data.train + data.test
    metrics = evaluate_detector(model, samples, image_size=meta["image_size"])
    run = new_run("eval", args.out, root=args.run)
    run.write_config({"verb": "detect eval", "run": args.run, "data": args.data, "split": args.split,
                      "reparam": args.reparam})  # fmt: skip
    run.write_summary(
        {**metrics, "per_class_ap50": dict(zip(meta["class_names"], metrics["per_class_ap50"], strict=True))}
    )
    print(
        f"{args.split} ({metrics['images']} images, {metrics['boxes']} boxes): mAP@0.5 {metrics['map50']:.4f}, "
        f"mAP@0.5:0.95 {metrics['map']:.4f}"
    )
    return 0


def _cmd_mask_train(args: argparse.Namespace) -> int:
    import torch

    from potpourri.core.runs import new_run
    from potpourri.detect.mask_head import (
        MaskHeadConfig,
        mask_coco_map,
        predict_instances,
        read_instance_data,
        save_mask_head,
        train_mask_head,
    )
    from potpourri.detect.train import load_detector

    if args.threads:
        torch.set_num_threads(args.threads)
    detector, meta = load_detector(args.run)
    train, test, names = read_instance_data(args.data, image_size=meta["image_size"], per_kind=args.per_kind,
                                            seed=args.seed)  # fmt: skip
    if tuple(names) != tuple(meta["class_names"]):
        raise PotpourriError(f"--data has classes {list(names)} but the detector knows {meta['class_names']}")
    cfg = MaskHeadConfig(max_steps=args.steps, max_seconds=args.seconds, lr=args.lr, seed=args.seed)
    run = new_run("mask", args.out, root=args.run)
    run.write_config({"verb": "detect mask-train", "run": args.run, "data": args.data, "steps": args.steps,
                      "seconds": args.seconds, "lr": args.lr, "seed": args.seed})  # fmt: skip
    run.write_env(args.seed)
    head, history = train_mask_head(detector, train, cfg)
    save_mask_head(run.path, head, {"detector_run": str(args.run), "data": args.data})
    metrics = mask_coco_map(predict_instances(detector, head, [s.image for s in test], conf=0.001), test, len(names))
    run.write_summary({**metrics, **{k: v for k, v in history.items() if k != "losses"},
                       "last_loss": history["losses"][-1] if history["losses"] else None})  # fmt: skip
    print(
        f"mask head: {history['steps']} steps in {history['train_s']:.0f}s ({history['trainable_params']} trainable "
        f"params, detector frozen); test mask mAP@0.5 {metrics['map50']:.4f}, mAP@0.5:0.95 {metrics['map']:.4f}; "
        f"{run.path}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``detect train``, ``predict``, ``eval`` and ``mask-train`` to the ``potpourri`` command."""
    from potpourri.models import yolo  # noqa: F401  (registers the detector variants)

    parser = subparsers.add_parser("detect", help="YOLOv6-style defect detector: train, predict, eval")
    verbs = parser.add_subparsers(dest="detect_verb", metavar="VERB")
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)

    train = verbs.add_parser("train", help="train a detector; test mAP, re-parameterisation parity, report.html")
    train.add_argument("--data", required=True, help="ds-synth:CATEGORY, a YOLO folder or a COCO json")
    train.add_argument("--model", default="yolo_rep_n", choices=("yolo_rep_n", "yolo_rep_s", "yolo_lite0_pan"))
    train.add_argument("--backbone-pretrained", action="store_true", help="yolo_lite0_pan: ImageNet backbone")
    train.add_argument("--out", help="run folder (default runs/detect/vN)")
    train.add_argument("--image-size", type=int, default=256, help="square input side, a multiple of 32")
    train.add_argument("--epochs", type=int, default=30)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    train.add_argument("--cls-loss", choices=("vfl", "bce"), default="vfl")
    train.add_argument(
        "--assigner", choices=("tal", "atss"), default="tal", help="label assignment: task-aligned (TAL) or ATSS"
    )
    train.add_argument("--eval-every", type=int, default=0, help="epochs between test mAP evaluations (0: at end)")
    train.add_argument("--per-kind", type=int, default=20, help="ds-synth: training images per defect kind")
    train.add_argument("--test-fraction", type=float, default=0.2, help="folders: share of images held out")
    train.add_argument("--conf", type=float, default=0.25, help="confidence of the boxes drawn in the report")
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints (needs --out)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None)
    train.set_defaults(func=_cmd_train)

    predict = verbs.add_parser("predict", help="detect boxes in images: drawn images and predictions.csv")
    flags.add_run(predict, "written by `potpourri detect train`")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    predict.add_argument("--conf", type=float, default=0.25)
    predict.add_argument("--iou", type=float, default=0.6, help="NMS IoU threshold")
    predict.add_argument("--no-reparam", action="store_true", help="run the multi-branch model (default: fused)")
    predict.add_argument("--out", help="output folder (default RUN/predict/vN)")
    predict.add_argument("--threads", type=int, default=None)
    predict.set_defaults(func=_cmd_predict)

    evaluate = verbs.add_parser("eval", help="COCO mAP@0.5 and mAP@0.5:0.95 of a trained detector")
    flags.add_run(evaluate, "written by `potpourri detect train`")
    evaluate.add_argument("--data", required=True, help="ds-synth:CATEGORY, a YOLO folder or a COCO json")
    evaluate.add_argument("--split", choices=("test", "all"), default="test")
    evaluate.add_argument("--reparam", action="store_true", help="evaluate the re-parameterised model")
    evaluate.add_argument("--per-kind", type=int, default=20)
    evaluate.add_argument("--test-fraction", type=float, default=0.2)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", help="output folder (default RUN/eval/vN)")
    evaluate.add_argument("--threads", type=int, default=None)
    evaluate.set_defaults(func=_cmd_eval)

    mask = verbs.add_parser("mask-train", help="train a mask head on the frozen detector (Mask Frozen-DETR style)")
    flags.add_run(mask, "written by `potpourri detect train`")
    mask.add_argument("--data", required=True, help="ds-synth:CATEGORY (instance masks from DS-Synth)")
    mask.add_argument("--steps", type=int, default=600)
    mask.add_argument("--seconds", type=float, default=None, help="stop after this wall clock (includes caching)")
    mask.add_argument("--lr", type=float, default=2e-3)
    mask.add_argument("--per-kind", type=int, default=20)
    mask.add_argument("--seed", type=int, default=0)
    mask.add_argument("--out", help="output folder (default RUN/mask/vN)")
    mask.add_argument("--threads", type=int, default=None)
    mask.set_defaults(func=_cmd_mask_train)
