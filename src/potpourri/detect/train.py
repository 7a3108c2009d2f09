"""Training and evaluation of ``potpourri.models.yolo`` detectors: assigner, losses, COCO mAP, one plain loop.

* **Assigners** (TAL, ATSS, ``make_assigner``) live in ``detect/assign`` and are re-exported here.
* **Losses** (YOLOv6 weights 1 : 2.5 : 0.5): varifocal (or BCE) on soft class targets, GIoU on boxes
  (``torchvision.ops.generalized_box_iou_loss``), distribution focal loss on the box bins; all normalised by the sum
  of target scores.
* **Metrics** ``coco_map``: COCO mAP@0.5 and mAP@0.5:0.95 through ``pycocotools`` (101-point interpolation, 100
  detections per image).
* **Loop** ``train_detector``: AdamW or SGD, linear warm-up then cosine (``potpourri.core.training.lr_at``), flips and
  quarter turns as augmentation, stepping through ``potpourri.core.training.Trainer`` (device, precision, clipping,
  atomic checkpoints, bitwise resume, best checkpoint by test mAP@0.5).

Length: losses, the loop and COCO-style evaluation of one detector, which share their tensor conventions; the
verbs' pipelines are in ``detect/pipeline``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.training import TrainOptions, autocast, resolve_device
from potpourri.data.boxes import DetectionSample
from potpourri.data.transforms import images_to_tensor
from potpourri.detect.assign import ASSIGNERS, AssignResult, ATSSAssigner, TaskAlignedAssigner, make_assigner
from potpourri.models.layers import varifocal_loss
from potpourri.models.yolo import (
    YoloDetector,
    dfl_expectation,
    distances_to_boxes,
    make_anchors,
    postprocess,
)

__all__ = [
    "ASSIGNERS",
    "ATSSAssigner",
    "AssignResult",
    "DetectTrainConfig",
    "DetectTrainResult",
    "DetectionLoss",
    "TaskAlignedAssigner",
    "augment",
    "build_detector",
    "coco_map",
    "collate",
    "detect_images",
    "distribution_focal_loss",
    "evaluate_detector",
    "load_detector",
    "make_assigner",
    "model_device",
    "model_options",
    "save_detector",
    "train_detector",
    "varifocal_loss",
]


def distribution_focal_loss(bin_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DFL (GFL, Li et al. 2020): cross-entropy towards the two bins around a continuous ``target``, weighted by
    nearness: ``(N, R+1), (N,) -> (N,)``; ``target`` must lie in [0, R)."""
    left = target.floor().long()
    weight_right = target - left.float()
    return (
        F.cross_entropy(bin_logits, left, reduction="none") * (1 - weight_right)
        + F.cross_entropy(bin_logits, left + 1, reduction="none") * weight_right
    )


class DetectionLoss:
    """Class + GIoU + DFL loss of a raw detector output against padded ground truth."""

    def __init__(
        self,
        num_classes: int,
        reg_max: int,
        strides: Sequence[int],
        *,
        cls_loss: str = "vfl",
        weights: tuple[float, float, float] = (1.0, 2.5, 0.5),
        assigner: TaskAlignedAssigner | ATSSAssigner | None = None,
    ):
        if cls_loss not in ("vfl", "bce"):
            raise PotpourriError(f"unknown class loss '{cls_loss}'; choose vfl or bce")
        self.num_classes, self.reg_max, self.strides = num_classes, reg_max, tuple(strides)
        self.cls_loss, self.weights = cls_loss, weights
        self.assigner = assigner or TaskAlignedAssigner(num_classes)
        # the sum of the score normaliser over processes (``Trainer.total_over_processes`` under torchrun), so each
        # process's loss is its share of the global batch's loss; None: this batch alone
        self.total: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(
        self,
        raw: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_mask: torch.Tensor,
        image_size: tuple[int, int],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its parts; ``raw`` (B, A, 4·(R+1)+K), ground truth padded to (B, M, ...)."""
        bins_count = 4 * (self.reg_max + 1)
        bin_logits, logits = raw[..., :bins_count], raw[..., bins_count:]  # (B, A, 4·(R+1)), (B, A, K)
        anchors, stride_of = make_anchors(image_size, self.strides, raw.device)
        distances = dfl_expectation(bin_logits, self.reg_max)  # (B, A, 4) in strides
        pd_boxes = distances_to_boxes(distances * stride_of[:, None], anchors)  # (B, A, 4) pixels
        assigned = self.assigner(
            logits.detach().sigmoid(), pd_boxes.detach(), anchors, gt_labels, gt_boxes, gt_mask, strides=stride_of
        )
        score_sum = assigned.scores.sum()
        score_sum = (self.total(score_sum) if self.total is not None else score_sum).clamp_min(1.0)

        if self.cls_loss == "vfl":
            positive = F.one_hot(assigned.labels, self.num_classes).float() * assigned.fg[..., None]
            loss_cls = varifocal_loss(logits, assigned.scores, positive) / score_sum
        else:
            loss_cls = F.binary_cross_entropy_with_logits(logits, assigned.scores, reduction="sum") / score_sum

        fg = assigned.fg
        if fg.any():
            from torchvision.ops import generalized_box_iou_loss

            weight = assigned.scores.sum(-1)[fg]  # (P,) each positive's soft score
            giou = generalized_box_iou_loss(pd_boxes[fg], assigned.boxes[fg], reduction="none")  # (P,)
            loss_box = (giou * weight).sum() / score_sum
            target = torch.cat([anchors - assigned.boxes[..., :2], assigned.boxes[..., 2:] - anchors], -1)
            target = (target / stride_of[None, :, None])[fg].clamp(0, self.reg_max - 0.01)  # (P, 4) in strides
            dfl = distribution_focal_loss(bin_logits[fg].reshape(-1, self.reg_max + 1), target.reshape(-1))
            loss_dfl = (dfl.reshape(-1, 4).mean(-1) * weight).sum() / score_sum
        else:
            loss_box = loss_dfl = bin_logits.sum() * 0.0  # keeps the graph connected on a batch without boxes
        w_cls, w_box, w_dfl = self.weights
        total = w_cls * loss_cls + w_box * loss_box + w_dfl * loss_dfl
        parts = {"loss_cls": loss_cls.item(), "loss_giou": loss_box.item(), "loss_dfl": loss_dfl.item()}
        return total, {**parts, "positives": int(fg.sum())}


# ----------------------------------------------------------------------------------------------- data
def augment(sample: DetectionSample, rng: np.random.Generator) -> DetectionSample:
    """Random horizontal/vertical flip and quarter turn of a square sample, boxes moved with the pixels."""
    image, boxes = sample.image, sample.boxes.copy()
    side = image.shape[0]
    if image.shape[0] != image.shape[1]:
        raise PotpourriError(f"augment expects square images, got {image.shape[1]}x{image.shape[0]}")
    if rng.random() < 0.5:  # horizontal flip: x -> side - x
        image, boxes = image[:, ::-1], np.stack([side - boxes[:, 2], boxes[:, 1], side - boxes[:, 0], boxes[:, 3]], 1)
    if rng.random() < 0.5:  # vertical flip: y -> side - y
        image, boxes = image[::-1], np.stack([boxes[:, 0], side - boxes[:, 3], boxes[:, 2], side - boxes[:, 1]], 1)
    for _ in range(int(rng.integers(0, 4))):  # np.rot90 (counter-clockwise): (x, y) -> (y, side - x)
        image, boxes = np.rot90(image), np.stack([boxes[:, 1], side - boxes[:, 2], boxes[:, 3], side - boxes[:, 0]], 1)
    return DetectionSample(np.ascontiguousarray(image), boxes.reshape(-1, 4), sample.labels, sample.name)


def collate(
    samples: Sequence[DetectionSample], mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) and ground truth padded to the batch's most boxes: labels, boxes, mask."""
    most = max([len(s.labels) for s in samples] + [1])
    labels = torch.zeros(len(samples), most, dtype=torch.long)
    boxes = torch.zeros(len(samples), most, 4)
    mask = torch.zeros(len(samples), most, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s.labels)
        labels[i, :n], boxes[i, :n], mask[i, :n] = torch.from_numpy(s.labels), torch.from_numpy(s.boxes), True
    return images_to_tensor([s.image for s in samples], mean, std).contiguous(), labels, boxes, mask


# ----------------------------------------------------------------------------------------------- metrics
def require_pycocotools() -> Any:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:
        raise PotpourriError("COCO mAP needs pycocotools: pip install 'pycocotools>=2.0.8'") from exc
    return COCO, COCOeval


def coco_map(
    predictions: Sequence[dict[str, Any]], targets: Sequence[DetectionSample], num_classes: int
) -> dict[str, Any]:
    """COCO ``map50``, ``map`` (0.5:0.95) and per-class AP@0.5 (NaN: class absent) by ``pycocotools``.

    ``predictions[i]`` holds ``boxes`` (N, 4) xyxy, ``scores`` and ``labels`` for ``targets[i]``.
    """
    if len(predictions) != len(targets):
        raise PotpourriError(f"{len(predictions)} predictions for {len(targets)} images")
    coco_cls, eval_cls = require_pycocotools()
    images, annotations, results = [], [], []
    for image_id, (pred, target) in enumerate(zip(predictions, targets, strict=True), start=1):
        height, width = target.image.shape[:2]
        images.append({"id": image_id, "width": width, "height": height})
        for box, label in zip(target.boxes.tolist(), target.labels.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                                "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
        boxes, scores, labels = (np.asarray(pred[k].cpu() if torch.is_tensor(pred[k]) else pred[k]) for k in
                                 ("boxes", "scores", "labels"))  # fmt: skip
        for box, score, label in zip(boxes.reshape(-1, 4).tolist(), scores.tolist(), labels.tolist(), strict=True):
            results.append({"image_id": image_id, "category_id": int(label) + 1, "score": float(score),
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})  # fmt: skip
    empty = {"map50": float("nan"), "map": float("nan"), "per_class_ap50": [float("nan")] * num_classes}
    if not annotations:
        return {**empty, "images": len(images), "boxes": 0, "detections": len(results)}
    if not results:
        present = {a["category_id"] - 1 for a in annotations}
        per_class = [0.0 if k in present else float("nan") for k in range(num_classes)]
        return {"map50": 0.0, "map": 0.0, "per_class_ap50": per_class, "images": len(images),
                "boxes": len(annotations), "detections": 0}  # fmt: skip
    truth = coco_cls()
    truth.dataset = {"images": images, "annotations": annotations,
                     "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)]}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and its summary table
        truth.createIndex()
        detections = truth.loadRes(results)
        evaluator = eval_cls(truth, detections, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    precision = evaluator.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all recalls, classes, area all, 100 dets
    per_class = [float(np.mean(p[p > -1])) if (p > -1).any() else float("nan") for p in precision.T]
    return {"map50": float(evaluator.stats[1]), "map": float(evaluator.stats[0]), "per_class_ap50": per_class,
            "images": len(images), "boxes": len(annotations), "detections": len(results)}  # fmt: skip


# ----------------------------------------------------------------------------------------------- inference
def model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` resolved (``auto`` | ``cpu`` | ``cuda[:N]``), or where ``model``'s parameters are when None."""
    if device is None:
        return next(model.parameters()).device
    return device if isinstance(device, torch.device) else resolve_device(device)


@torch.no_grad()
def detect_images(
    model: YoloDetector,
    images: Sequence[np.ndarray],
    *,
    image_size: int,
    conf: float = 0.25,
    iou: float = 0.6,
    max_det: int = 100,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> list[dict[str, np.ndarray]]:
    """Detections per (H, W, 3) uint8 image, in that image's own pixels: ``boxes``, ``scores``, ``labels``.

    The model runs on ``device`` (None: where it is) under ``precision`` autocast; boxes are decoded in fp32."""
    from PIL import Image

    from potpourri.core.training import check_precision

    device = model_device(model, device)
    check_precision(precision, device)
    model.to(device).eval()
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        resized = [
            im if im.shape[:2] == (image_size, image_size)
            else np.asarray(Image.fromarray(im).resize((image_size, image_size), Image.Resampling.BILINEAR))
            for im in chunk
        ]  # fmt: skip
        with autocast(device, precision):
            raw = model(images_to_tensor(resized, model.mean, model.std).contiguous().to(device))
        found = postprocess(raw.float(), model, image_size=(image_size, image_size), conf=conf, iou=iou,
                            max_det=max_det)  # fmt: skip
        for im, det in zip(chunk, found, strict=True):
            scale = np.array([im.shape[1], im.shape[0], im.shape[1], im.shape[0]], np.float32) / image_size
            out.append({"boxes": det["boxes"].cpu().numpy() * scale, "scores": det["scores"].cpu().numpy(),
                        "labels": det["labels"].cpu().numpy()})  # fmt: skip
    return out


def evaluate_detector(
    model: YoloDetector,
    samples: Sequence[DetectionSample],
    *,
    image_size: int,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """COCO mAP of ``model`` on ``samples`` (confidence 0.001, NMS IoU 0.6, 100 detections per image), run on
    ``device`` (None: where the model is) under ``precision``."""
    predictions = detect_images(model, [s.image for s in samples], image_size=image_size, conf=0.001,
                                batch_size=batch_size, device=device, precision=precision)  # fmt: skip
    return coco_map(predictions, samples, model.num_classes)


# ----------------------------------------------------------------------------------------------- saving
def save_detector(folder: str | os.PathLike, model: YoloDetector, meta: dict[str, Any]) -> Path:
    """Write ``detector.safetensors`` and ``detector.json`` (architecture, classes, input size, normalisation)."""
    from potpourri.core.io import atomic_write_bytes, save_state_dict_atomic

    folder = Path(folder)
    save_state_dict_atomic(model.state_dict(), folder / "detector.safetensors")
    record = {**meta, "num_classes": model.num_classes, "reg_max": model.reg_max, "mean": list(model.mean),
              "std": list(model.std), "strides": list(model.strides)}  # fmt: skip
    atomic_write_bytes(folder / "detector.json", json.dumps(record, indent=2).encode())
    return folder / "detector.safetensors"


def load_detector(folder: str | os.PathLike) -> tuple[YoloDetector, dict[str, Any]]:
    """The detector saved by ``save_detector`` (or ``potpourri detect train``) in eval mode, and its metadata."""
    from potpourri.core.io import load_state_dict_file
    from potpourri.core.registry import create_model

    folder = Path(folder)
    meta_path = folder / "detector.json"
    if not meta_path.is_file():
        raise PotpourriError(
            f"'{folder}' holds no detector.json; pass a run folder written by `potpourri detect train`"
        )
    meta = json.loads(meta_path.read_text())
    model = create_model(meta["model"], num_classes=meta["num_classes"], reg_max=meta["reg_max"],
                         **meta.get("model_options", {}))  # fmt: skip
    state = load_state_dict_file(folder / "detector.safetensors", fix="re-run `potpourri detect train`")
    model.load_state_dict(state)
    return model.eval(), meta


# ----------------------------------------------------------------------------------------------- training
@dataclass
class DetectTrainConfig:
    """Every knob of detector training."""

    model: str = "yolo_rep_n"
    class_names: tuple[str, ...] = ()
    image_size: int = 256
    epochs: int = 30
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 5e-4
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.937, as YOLOv6)
    warmup_steps: int = 30
    min_lr_ratio: float = 0.05
    grad_clip: float | None = 10.0
    cls_loss: str = "vfl"  # vfl | bce
    loss_weights: tuple[float, float, float] = (1.0, 2.5, 0.5)  # class, GIoU, DFL (YOLOv6)
    assigner: str = "tal"  # tal | atss
    atss_warmup_epochs: int = 0  # YOLOv6 v3: ATSS for these first epochs, then `assigner`
    neck: str = "reppan"  # reppan | bic (YOLOv6 v3 BiC top-down fusion)
    sppf: str = "simsppf"  # simsppf | simcspsppf (yolo_rep_* only)
    aat: bool = False  # anchor-aided training branch (dropped at inference)
    topk: int | None = None  # candidates per box (tal: 13) or per box and level (atss: 9)
    augment: bool = True
    backbone_pretrained: bool = False  # yolo_lite0_pan: ImageNet EfficientNet-Lite0 backbone
    eval_every: int = 0  # epochs between test mAP evaluations; 0: only at the end
    seed: int = 0
    progress: bool = True


@dataclass
class DetectTrainResult:
    """The trained model (eval mode), per-epoch history and wall time."""

    model: YoloDetector
    history: list[dict[str, Any]]
    seconds: float
    steps: int
    final: dict[str, Any] = field(default_factory=dict)


def build_detector(cfg: DetectTrainConfig) -> YoloDetector:
    """The configured detector with ``len(cfg.class_names)`` classes."""
    from potpourri.core.registry import create_model

    if not cfg.class_names:
        raise PotpourriError("class_names is empty; a detector needs at least one class")
    extra = {"backbone_pretrained": True} if cfg.backbone_pretrained else {}
    if cfg.backbone_pretrained and cfg.model != "yolo_lite0_pan":
        raise PotpourriError(f"--backbone-pretrained needs --model yolo_lite0_pan (got '{cfg.model}')")
    return create_model(cfg.model, num_classes=len(cfg.class_names), **model_options(cfg), **extra)


def model_options(cfg: DetectTrainConfig) -> dict[str, Any]:
    """The detector options of ``cfg`` that differ from the defaults (``neck``, ``sppf``, ``aat``)."""
    chosen = {"neck": cfg.neck, "sppf": cfg.sppf, "aat": cfg.aat}
    defaults = {"neck": "reppan", "sppf": "simsppf", "aat": False}
    return {k: v for k, v in chosen.items() if v != defaults[k]}


def _optimizer(model: nn.Module, cfg: DetectTrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]  # conv weights; no decay on BN, biases
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.937, nesterov=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise PotpourriError(f"unknown optimizer '{cfg.optimizer}'; choose adamw or sgd")


def train_detector(
    train: Sequence[DetectionSample],
    test: Sequence[DetectionSample] | None,
    cfg: DetectTrainConfig,
    *,
    run_path: str | os.PathLike | None = None,
    resume: bool = False,
    model: YoloDetector | None = None,
    options: TrainOptions | None = None,
) -> DetectTrainResult:
    """Train a detector on ``train`` (square images of ``cfg.image_size``); checkpoints in ``run_path/checkpoints``.

    ``options`` sets device, precision and checkpointing (``checkpoint_every`` 0: once per epoch); ``resume`` (or
    ``options.resume``) continues from the last checkpoint. ``cfg.grad_clip`` applies unless ``options`` sets one.

    Example:
        result = train_detector(data.train, data.test, DetectTrainConfig(class_names=data.class_names, epochs=5))
    """
    from potpourri.core.runs import seed_everything
    from potpourri.core.training import Trainer, epoch_batches, lr_at
    from potpourri.detect.yolo_v3 import AnchorAidedLoss, assigner_at

    if not train:
        raise PotpourriError("no training images")
    if any(s.image.shape[:2] != (cfg.image_size, cfg.image_size) for s in train):
        raise PotpourriError(f"training images must be {cfg.image_size}x{cfg.image_size}; resize them first")
    assigner_at(0, cfg.assigner, cfg.atss_warmup_epochs)  # a negative warm-up fails before anything is built
    seed_everything(cfg.seed)
    model = model if model is not None else build_detector(cfg)
    model.train()
    assigners = {name: make_assigner(name, model.num_classes, topk=cfg.topk) for name in {cfg.assigner, "atss"}}
    loss_fn = DetectionLoss(
        model.num_classes, model.reg_max, model.strides, cls_loss=cfg.cls_loss, weights=cfg.loss_weights,
        assigner=assigners[cfg.assigner],
    )  # fmt: skip
    aided_loss = (
        AnchorAidedLoss(model.num_classes, model.strides, model.head.anchor_shapes)
        if model.head.has_anchor_branch
        else None
    )
    optimizer = _optimizer(model, cfg)
    batch_size = min(cfg.batch_size, len(train))
    drop_last = len(train) % batch_size == 1  # a batch of one image breaks BatchNorm
    steps_per_epoch = len(epoch_batches(len(train), batch_size, seed=0, epoch=0, shuffle=False, drop_last=drop_last))
    total = cfg.epochs * steps_per_epoch
    checkpoints = Path(run_path) / "checkpoints" if run_path is not None else None
    options = options or TrainOptions()
    options = replace(
        options,
        grad_clip=options.grad_clip if options.grad_clip is not None else cfg.grad_clip,
        checkpoint_every=options.checkpoint_every or steps_per_epoch,
        progress=options.progress and cfg.progress,
        resume=options.resume or resume,
    )
    if options.resume and checkpoints is None:
        raise PotpourriError("resume needs a run folder")
    saved = checkpoints / "last.json" if checkpoints is not None else None
    if options.resume and saved is not None and saved.is_file() and "optimizers" not in json.loads(saved.read_text()):
        raise PotpourriError(f"'{checkpoints}' holds a checkpoint of an older potpourri that cannot be resumed; "
                             "train again without --resume")  # fmt: skip
    trainer = Trainer(model, optimizer, total_steps=total, options=options, folder=checkpoints, desc="detect train")
    device = trainer.device
    loss_fn.total = trainer.total_over_processes  # normalisers of the global batch (identities in one process)
    if aided_loss is not None:
        aided_loss.total = trainer.total_over_processes
    # what changes across steps besides weights and optimizer: the open epoch's loss sums and the history rows
    state = trainer.state
    if not options.resume:
        state.update(history=[], sums={}, open=None, lr=0.0, seconds=0.0)
    started = time.perf_counter() - state["seconds"]
    size = (cfg.image_size, cfg.image_size)

    def close_epoch() -> bool:
        """The history row of the epoch whose steps all ran (and its test mAP when due); True: stop early."""
        epoch, sums = state["open"], state["sums"]
        row: dict[str, Any] = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "lr": state["lr"],
                               "assigner": assigner_at(epoch, cfg.assigner, cfg.atss_warmup_epochs)}  # fmt: skip
        row.update({k: v / steps_per_epoch for k, v in sums.items()})
        row["seconds"] = time.perf_counter() - started
        state.update(open=None, sums={})
        last = epoch + 1 == cfg.epochs
        if test and (last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0)):
            metrics = evaluate_detector(model, test, image_size=cfg.image_size, device=device,
                                        precision=options.precision)  # fmt: skip
            row.update(test_map50=metrics["map50"], test_map=metrics["map"])
            model.train()
        state["history"].append(row)
        if math.isfinite(row.get("test_map50", math.nan)):  # best.safetensors follows test mAP@0.5; a checkpoint
            return trainer.report(row["test_map50"])  # early stop with options.patience
        return False

    for step in trainer.steps():
        epoch, batch_index = divmod(step, steps_per_epoch)
        if state["open"] is not None and state["open"] != epoch and close_epoch():  # lazily: a kill between an
            break  # epoch's last update and its row loses nothing
        state["open"] = epoch
        model.train()
        batches = epoch_batches(len(train), batch_size, seed=cfg.seed, epoch=epoch, shuffle=True, drop_last=drop_last)
        rng = np.random.default_rng([cfg.seed, epoch, batch_index])  # a function of the position: resumable
        chosen = [augment(train[i], rng) if cfg.augment else train[i] for i in batches[batch_index]]
        chosen, _ = trainer.shard(chosen)  # under torchrun: this process's slice of the augmented global batch
        images, gt_labels, gt_boxes, gt_mask = (t.to(device) for t in collate(chosen, model.mean, model.std))
        lr = lr_at(step, base=cfg.lr, total=total, warmup=cfg.warmup_steps, min_ratio=cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_fn.assigner = assigners[assigner_at(epoch, cfg.assigner, cfg.atss_warmup_epochs)]
        with trainer.autocast():
            out = model(images)  # (B, A, 4·(R+1)+K), and with AAT (B, A·na, 4+K)
        raw, raw_anchor = out if isinstance(out, tuple) else (out, None)
        loss, parts = loss_fn(raw.float(), gt_labels, gt_boxes, gt_mask, size)
        if aided_loss is not None and raw_anchor is not None:
            loss_ab, parts_ab = aided_loss(raw_anchor.float(), gt_labels, gt_boxes, gt_mask, size, loss_fn.assigner)
            loss, parts = loss + loss_ab, {**parts, **parts_ab}
        # each process's loss is its slice's sums over the global normaliser: the processes' losses add up to the
        # global loss (logged), and the trainer averages gradients over processes, hence the factor
        sums = state["sums"]
        for key, value in trainer.sums_over_processes({"loss": loss.detach().float().item(), **parts}).items():
            sums[key] = sums.get(key, 0.0) + value
        loss = loss * trainer.group.world
        state["lr"], state["seconds"] = lr, time.perf_counter() - started
        trainer.update(loss, lr=f"{lr:.2e}")
    if state["open"] is not None:
        close_epoch()
    trainer.finish()
    seconds = time.perf_counter() - started
    model.eval()
    history = state["history"]
    return DetectTrainResult(model, history, seconds, trainer.step, history[-1] if history else {})
