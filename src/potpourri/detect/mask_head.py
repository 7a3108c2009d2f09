"""Mask Frozen-DETR at toy scale: a light mask head trained on top of a FROZEN box detector.

After Liang & Yuan, "Mask Frozen-DETR" (arXiv 2308.03747; withdrawn from ICLR 2024, no official code). The paper's
idea: keep a trained detector entirely frozen and train only a lightweight network that predicts each instance's mask
*inside the box the detector gives*, from the detector's features and the instance's query embedding. The head sees
the detector only through the ``potpourri.detect.frozen.FrozenDetector`` contract, so the same code runs on a
transformers DETR / Conditional DETR / Deformable DETR, on our small DETR (``potpourri.detect.detr``) and on our
anchor-free YOLOv6-style detector (whose "queries" are anchor points).

Exact design (our own code; every number is a default of ``MaskHeadConfig``):

1. **Frozen detector outputs** (``FrozenDetector.outputs``; under ``torch.no_grad`` in eval mode, so no BN
   statistics move): a fine map (stride 4) and a coarse map, and per query a box, class probabilities and an
   embedding. For a DETR: the backbone's stride-4 map, the encoder memory and the **last decoder layer's output of
   the query**. For our YOLO (``frozen_outputs``): the backbone's stride-4 map (EfficientRep ``stages.0``, ``blocks.1``
   for the Lite0 backbone), the neck's P3 and, as the *instance embedding*, the head's class ⊕ box branch features
   at the **winning anchor** (``2·C_l`` channels at level ``l``, one projection per level).
   *Which query an instance gets*: at inference the detection's own query (a DETR's thresholded queries; our YOLO's
   NMS survivors). In training (ground-truth boxes, ``FrozenDetector.assign``): for a DETR, **Hungarian matching**
   of the ground truth to the frozen detector's predictions on DETR's own matching cost (5·L1 − 2·GIoU − p(class));
   for our YOLO, the anchor whose decoded box overlaps the ground-truth box most (IoU). The RoI is always the
   (jittered) ground-truth box and the query the matched one's embedding: a choice that trains the head on exact
   targets while its query comes from the detector's own set, as at inference.
2. **Image feature encoder**: 1×1 lateral convs of the fine map and of the coarse one (P3 / DETR memory) to
   ``dim`` = 64 channels, the coarse upsampled bilinearly to the fine map's stride and added, then 3×3 conv →
   GroupNorm(8) → ReLU → 3×3 conv: a stride-4 pixel embedding map (the paper: deformable encoder layers at stride 4
   + a projected stride-4 backbone feature).
3. **Box feature encoder**: ``torchvision.ops.roi_align`` of the pixel map in each box, ``roi_size`` = 28,
   ``spatial_scale`` = 1/(the fine map's stride, 4), ``sampling_ratio`` = 2, ``aligned=True``; two (x, y) ∈ [−1, 1]
   coordinate channels are concatenated (positional encoding), then two 3×3 conv → GroupNorm(8) → ReLU layers (the
   paper: two deformable encoder layers with sine positions).
4. **Query feature encoder**: a linear map per embedding group (a DETR: one, ``d_model → dim``; our YOLO: one per
   level, ``2·C_l → dim``) of the query embedding, then an MLP
   (Linear → ReLU → Linear).
5. **Mask prediction**: ``logits[k, y, x] = <R_k[:, y, x], q_k> / sqrt(dim) + b``: the dot product of each RoI
   pixel feature with the instance's query, 28×28 logits inside the box, pasted back into the image by
   ``paste_masks`` (bilinear ``grid_sample``; a mask texel covers 1/28 of the box, exactly as ``roi_align``).
6. **Losses** (``mask_losses``): per-pixel BCE (mean) + Dice (``1 − (2Σpt + 1)/(Σp + Σt + 1)`` per instance,
   mean), weight 1 each, on 28×28 targets = ``roi_align`` of the instance's binary mask in the same box, ≥ 0.5
   (Mask R-CNN's target). No mask-IoU scoring head: mask score = detection score.
7. **Training** uses ground-truth boxes jittered by ±``jitter`` (10 %) of their width/height as RoIs (Mask R-CNN's
   recipe); inference uses the detector's boxes. Because the detector is frozen, its outputs are computed once per
   training image and cached: each mask-head step costs only the head (no augmentation; a deliberate choice).

Instances come from DS-Synth masks: one per connected defect region, exactly the regions ``potpourri.data.boxes``
turns into boxes (``instance_masks_from_mask``). Mask AP is COCO's (``pycocotools``, ``iouType="segm"``).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from potpourri.core.errors import PotpourriError
from potpourri.core.training import TrainOptions, autocast
from potpourri.data.transforms import images_to_tensor
from potpourri.detect.frozen import (
    DetectorOutputs,
    FrozenDetector,
    FrozenOutputs,
    as_frozen,
    clip_boxes,
    frozen_outputs,
    winning_anchors,
)
from potpourri.models.layers import dice_loss, soft_dice

__all__ = [
    "DetectorOutputs",
    "FrozenDetector",
    "FrozenOutputs",
    "InstanceSample",
    "MaskHead",
    "MaskHeadConfig",
    "freeze",
    "frozen_outputs",
    "instance_masks_from_mask",
    "jitter_boxes",
    "load_mask_head",
    "mask_coco_map",
    "mask_losses",
    "mask_targets",
    "paste_masks",
    "predict_instances",
    "read_instance_data",
    "save_mask_head",
    "synth_instance_samples",
    "train_mask_head",
    "winning_anchors",
]


# ----------------------------------------------------------------------------------------------- data
@dataclass
class InstanceSample:
    """An (H, W, 3) uint8 image, instance ``masks`` (N, H, W) bool, their ``boxes`` (N, 4) xyxy and ``labels`` (N,)."""

    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    name: str = ""


def instance_masks_from_mask(
    mask: np.ndarray, *, merge_gap: float = 0.03, min_pixels: int = 12, class_offset: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Instance masks (N, H, W) bool, boxes (N, 4) and labels (N,) of a class-index mask.

    The same regions, in the same order, as ``potpourri.data.boxes.boxes_from_mask`` (merged connected regions).
    """
    if mask.ndim != 2:
        raise PotpourriError(f"mask must be (H, W) class indices, got shape {mask.shape}")
    grow = math.ceil(merge_gap * max(mask.shape) / 2)
    eight = np.ones((3, 3), bool)
    masks, boxes, labels = [], [], []
    for value in np.unique(mask):
        if value < class_offset:
            continue
        region = mask == value
        joined = ndimage.binary_dilation(region, eight, iterations=grow) if grow else region
        components, count = ndimage.label(joined, structure=eight)
        components = np.where(region, components, 0)
        for index, found in enumerate(ndimage.find_objects(components, max_label=count), start=1):
            if found is None or (components[found] == index).sum() < min_pixels:
                continue
            ys, xs = found
            masks.append(components == index)
            boxes.append((xs.start, ys.start, xs.stop, ys.stop))
            labels.append(int(value) - class_offset)
    out = np.stack(masks) if masks else np.zeros((0, *mask.shape), bool)
    return out, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


def synth_instance_samples(
    category: str, split: str, n: int, *, seed: int = 0, size: int = 256, kinds: Sequence[str] | None = None
) -> list[InstanceSample]:
    """``n`` DS-Synth samples with instance masks (the sampling of ``boxes.synth_detection_samples``)."""
    from potpourri.data.synth import DEFECTS, MULTI, make_samples

    kinds = tuple(kinds) if kinds is not None else (*DEFECTS, MULTI)
    out = []
    for s in make_samples(category, split, n, seed=seed, size=size, kinds=kinds):
        masks, boxes, labels = instance_masks_from_mask(s.mask)
        out.append(InstanceSample(s.image, masks, boxes, labels, f"{s.category}/{s.split}/{s.kind}/{s.index:03d}"))
    return out


def read_instance_data(
    spec: str, *, image_size: int = 256, per_kind: int = 20, seed: int = 0
) -> tuple[list[InstanceSample], list[InstanceSample], tuple[str, ...]]:
    """Train and test instance samples of ``ds-synth:<category>``, split as ``boxes.read_detection_data`` does."""
    from potpourri.data.synth import CATEGORIES, DEFECTS, MULTI

    category = spec.split(":", 1)[1] if spec.startswith("ds-synth:") else None
    if category not in CATEGORIES:
        raise PotpourriError(f"mask data must be ds-synth:<category> with one of {', '.join(CATEGORIES)}; got '{spec}'")
    kinds = (*DEFECTS, MULTI)
    train = synth_instance_samples(category, "train", per_kind * len(kinds), seed=seed, size=image_size)
    train += synth_instance_samples(category, "train", max(1, per_kind // 2), seed=seed, size=image_size,
                                    kinds=("good",))  # fmt: skip
    test = synth_instance_samples(category, "test", max(2, per_kind // 2) * len(kinds), seed=seed, size=image_size)
    return train, test, tuple(DEFECTS)


# ----------------------------------------------------------------------------------------------- mask head
@dataclass
class MaskHeadConfig:
    """Mask-head sizes and the training recipe."""

    dim: int = 64
    roi_size: int = 28
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    max_steps: int = 600
    max_seconds: float | None = None
    jitter: float = 0.1
    seed: int = 0
    progress: bool = True


def _conv_gn(in_chs: int, out_chs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False), nn.GroupNorm(8, out_chs), nn.ReLU())


class MaskHead(nn.Module):
    """Image encoder (stride 4) → RoIAlign → box encoder; query MLP; mask logits = <RoI pixel, query> (module doc)."""

    def __init__(self, fine_chs: int, p3_chs: int, embed_dims: Sequence[int], dim: int = 64, roi_size: int = 28):
        super().__init__()
        self.dim, self.roi_size = dim, roi_size
        self.lateral_fine = nn.Conv2d(fine_chs, dim, 1)
        self.lateral_p3 = nn.Conv2d(p3_chs, dim, 1)
        self.pixel = nn.Sequential(_conv_gn(dim, dim), nn.Conv2d(dim, dim, 3, padding=1))
        self.box = nn.Sequential(_conv_gn(dim + 2, dim), _conv_gn(dim, dim))
        self.level_proj = nn.ModuleList(nn.Linear(c, dim) for c in embed_dims)
        self.query = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.bias = nn.Parameter(torch.zeros(()))

    @classmethod
    def for_detector(cls, detector: nn.Module | FrozenDetector, dim: int = 64, roi_size: int = 28) -> MaskHead:
        """A head sized to ``detector``'s fine and coarse feature maps and its query-embedding widths."""
        frozen = as_frozen(detector)
        fine_chs, coarse_chs = frozen.feature_channels
        return cls(fine_chs, coarse_chs, list(frozen.embed_dims), dim, roi_size)

    def pixel_map(self, fine: torch.Tensor, p3: torch.Tensor) -> torch.Tensor:
        """Pixel embeddings (B, dim, h, w) at the fine map's stride; ``p3`` is any coarser map (P3, DETR memory)."""
        up = F.interpolate(self.lateral_p3(p3), size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.pixel(self.lateral_fine(fine) + up)

    def queries(self, embeds: Sequence[torch.Tensor], image_index: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """Query vectors (K, dim) of the detector's queries ``anchor`` (indices into all embedding groups) of images
        ``image_index``."""
        out = torch.zeros(len(anchor), self.dim, device=anchor.device)
        start = 0
        for level, emb in enumerate(embeds):
            count = emb.shape[1]
            pick = (anchor >= start) & (anchor < start + count)
            if pick.any():
                projected = self.level_proj[level](emb[image_index[pick], anchor[pick] - start])
                out = out.index_put((pick.nonzero()[:, 0],), projected.to(out.dtype))  # bf16 under autocast
            start += count
        return self.query(out)

    def forward(
        self, pixels: torch.Tensor, rois: torch.Tensor, queries: torch.Tensor, stride: float = 4.0
    ) -> torch.Tensor:
        """Mask logits (K, S, S) in each RoI (K, 5) = (image index, x1, y1, x2, y2) pixels, given queries (K, dim)."""
        from torchvision.ops import roi_align

        size = self.roi_size
        feats = roi_align(pixels, rois, size, spatial_scale=1.0 / stride, sampling_ratio=2, aligned=True)
        axis = (torch.arange(size, device=feats.device, dtype=feats.dtype) + 0.5) / size * 2 - 1
        ys, xs = torch.meshgrid(axis, axis, indexing="ij")
        coords = torch.stack([xs, ys])[None].expand(len(feats), -1, -1, -1)
        feats = self.box(torch.cat([feats, coords], 1))  # (K, dim, S, S)
        return torch.einsum("kchw,kc->khw", feats, queries) / math.sqrt(self.dim) + self.bias


# ----------------------------------------------------------------------------------------------- geometry
def jitter_boxes(boxes: torch.Tensor, amount: float, image_size: tuple[int, int], generator: torch.Generator):
    """Each side moved by U(−amount, amount) × the box's width/height, clipped to the image, at least 1 px wide."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    moved = boxes + (torch.rand(boxes.shape, generator=generator) * 2 - 1) * amount * wh
    height, width = image_size
    x1, x2 = moved[:, 0].clamp(0, width - 1), moved[:, 2].clamp(0, width)
    y1, y2 = moved[:, 1].clamp(0, height - 1), moved[:, 3].clamp(0, height)
    return torch.stack([x1, y1, torch.maximum(x2, x1 + 1), torch.maximum(y2, y1 + 1)], 1)


def mask_targets(masks: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Binary (K, S, S) targets: ``roi_align`` of each instance mask (K, H, W) in its box (K, 4), ≥ 0.5."""
    from torchvision.ops import roi_align

    if len(masks) == 0:
        return torch.zeros(0, size, size)
    rois = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype)[:, None], boxes], 1)
    return (roi_align(masks[:, None].float(), rois, size, 1.0, sampling_ratio=2, aligned=True)[:, 0] >= 0.5).float()


def paste_masks(probs: torch.Tensor, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """In-box mask probabilities (K, S, S) → full-image (K, H, W): texel (i, j) covers 1/S of its box, as RoIAlign."""
    height, width = image_size
    if len(probs) == 0:
        return torch.zeros(0, height, width, device=probs.device)
    xs = torch.arange(width, dtype=probs.dtype, device=probs.device) + 0.5
    ys = torch.arange(height, dtype=probs.dtype, device=probs.device) + 0.5
    gx = (xs[None] - boxes[:, 0:1]) / (boxes[:, 2:3] - boxes[:, 0:1]).clamp_min(1e-6) * 2 - 1  # (K, W)
    gy = (ys[None] - boxes[:, 1:2]) / (boxes[:, 3:4] - boxes[:, 1:2]).clamp_min(1e-6) * 2 - 1  # (K, H)
    grid = torch.stack([gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)], -1)
    return F.grid_sample(probs[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


# ----------------------------------------------------------------------------------------------- losses
def mask_losses(
    logits: torch.Tensor, targets: torch.Tensor, *, instances: float | torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """``bce`` (mean per pixel), ``dice`` and ``total`` = bce + dice. Both are means over instances (every instance
    has the same RoI pixels); ``instances`` divides their sums by another count instead, e.g. the global batch's
    under torchrun, so each process's loss is its share of the global one."""
    if instances is None:
        bce = F.binary_cross_entropy_with_logits(logits, targets)
        dice = dice_loss(logits.sigmoid(), targets)
    else:
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1).sum() / instances
        probs = logits.sigmoid().flatten(1)
        dice = (1 - soft_dice(probs, targets.flatten(1).to(probs.dtype), 1, 1.0)).sum() / instances
    return {"bce": bce, "dice": dice, "total": bce + dice}


# ----------------------------------------------------------------------------------------------- training
def _normalise(images: Sequence[np.ndarray], frozen: FrozenDetector) -> torch.Tensor:
    device = next(frozen.module.parameters()).device
    return images_to_tensor(images, frozen.mean, frozen.std).contiguous().to(device)


def _cache(frozen: FrozenDetector, samples: Sequence[InstanceSample], batch_size: int = 16) -> DetectorOutputs:
    parts = [frozen.outputs(_normalise([s.image for s in samples[i : i + batch_size]], frozen))
             for i in range(0, len(samples), batch_size)]  # fmt: skip
    return DetectorOutputs.cat(parts)


def freeze(detector: nn.Module) -> nn.Module:
    """Put ``detector`` in eval mode with every parameter's ``requires_grad`` off; returns it."""
    detector.eval()
    for p in detector.parameters():
        p.requires_grad_(False)
    return detector


def _step_batch(
    head: MaskHead,
    frozen: FrozenDetector,
    cache: DetectorOutputs,
    samples: Sequence[InstanceSample],
    picks: Sequence[int],
    cfg: MaskHeadConfig,
    generator: torch.Generator,
    amp: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    trainer: Any = None,
) -> dict[str, torch.Tensor] | None:
    """The losses of one batch of ``picks``; None when no pick has an assigned instance. With a ``trainer`` under
    torchrun every process jitters the boxes of all picks (one generator state) and keeps its slice of the images;
    its losses are sums over its instances divided by the global batch's instance count."""
    device = cache.boxes.device
    items = []  # (pick row, rois' boxes, query, targets) of every pick with an instance, in order
    for i in picks:
        s = samples[i]
        gt_index, query = frozen.assign(cache, i, torch.from_numpy(s.boxes), torch.from_numpy(s.labels))
        if len(gt_index) == 0:
            continue
        gt = torch.from_numpy(s.boxes)[gt_index]
        boxes = jitter_boxes(gt, cfg.jitter, s.image.shape[:2], generator)
        items.append((i, boxes, query, mask_targets(torch.from_numpy(s.masks)[gt_index], boxes, head.roi_size)))
    if not items:
        return None
    total = float(sum(len(boxes) for _, boxes, _, _ in items))
    sharded = trainer is not None and trainer.group.distributed
    if sharded:
        items = list(trainer.shard(items)[0])
    rois, anchors, image_index, targets = [], [], [], []
    for row, (_, boxes, query, target) in enumerate(items):
        rois.append(torch.cat([torch.full((len(boxes), 1), float(row)), boxes], 1))
        anchors.append(query.to(device))
        image_index.append(torch.full((len(boxes),), row, dtype=torch.long))
        targets.append(target)
    part = cache.rows(torch.as_tensor([i for i, _, _, _ in items], device=device))
    with amp():  # the trainer's autocast
        pixels = head.pixel_map(part.features[0], part.features[-1])
        rows = torch.cat(image_index).to(device)
        queries = head.queries(part.embeds, rows, torch.cat(anchors))
        logits = head(pixels, torch.cat(rois).to(device), queries, stride=part.strides[0])
    # the trainer averages gradients over processes: a share of the global loss is scaled by the process count
    instances = total / trainer.group.world if sharded else None
    return mask_losses(logits.float(), torch.cat(targets).to(device), instances=instances)


def train_mask_head(
    detector: nn.Module | FrozenDetector,
    samples: Sequence[InstanceSample],
    cfg: MaskHeadConfig | None = None,
    head: MaskHead | None = None,
    *,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> tuple[MaskHead, dict[str, Any]]:
    """Freeze ``detector`` (our YOLO, a transformers DETR or any ``FrozenDetector``), cache its outputs on ``samples``
    and train a ``MaskHead`` (AdamW, cosine); head, history.

    ``options`` sets device, precision, checkpointing and resume (from ``checkpoints``, the checkpoint folder)."""
    from potpourri.core.training import Trainer

    cfg = cfg or MaskHeadConfig()
    if not samples:
        raise PotpourriError("no training samples for the mask head")
    options = options or TrainOptions()
    options = replace(options, progress=options.progress and cfg.progress)
    torch.manual_seed(cfg.seed)
    frozen = as_frozen(detector)
    freeze(frozen.module)
    start = time.perf_counter()
    head = head or MaskHead.for_detector(detector, cfg.dim, cfg.roi_size)
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, cfg.max_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    trainer = Trainer(
        head, optimizer, total_steps=cfg.max_steps, options=options, folder=checkpoints, desc="mask head",
        schedulers={"cosine": schedule}, generators={"jitter": generator, "picks": rng},
    )  # fmt: skip
    if not options.resume:
        trainer.state["losses"] = []
    losses: list[float] = trainer.state["losses"]
    frozen.module.to(trainer.device)
    cache = _cache(frozen, samples)  # the frozen detector runs once, on the training device
    cache_s = time.perf_counter() - start
    with_boxes = [i for i, s in enumerate(samples) if len(s.boxes)]
    for _ in trainer.steps():
        over = cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds
        if trainer.group.broadcast_object(over):  # rank 0's clock decides for every process
            break
        out = None
        while out is None:  # every pick has boxes, so one draw always gives a batch (the same on every process)
            picks = rng.choice(with_boxes, size=min(cfg.batch_size, len(with_boxes)), replace=False).tolist()
            out = _step_batch(head, frozen, cache, samples, picks, cfg, generator, trainer.autocast, trainer)
        # before update(), whose checkpoint must hold it; under torchrun the global batch's loss
        losses.append(trainer.mean_over_processes(float(out["total"].detach())))
        trainer.update(out["total"])
    trainer.finish()
    history = {"steps": trainer.step, "losses": losses, "train_s": time.perf_counter() - start, "cache_s": cache_s,
               "trainable_params": sum(p.numel() for p in head.parameters())}  # fmt: skip
    return head.eval(), history


# ----------------------------------------------------------------------------------------------- saving
def save_mask_head(folder: str | os.PathLike, head: MaskHead, meta: dict[str, Any]) -> Path:
    """Write ``mask_head.safetensors`` and ``mask_head.json`` (sizes, detector run) atomically."""
    from potpourri.core.io import save_bundle

    folder = Path(folder)
    embed_dims = [m.in_features for m in head.level_proj]
    sizes = {"fine_chs": head.lateral_fine.in_channels, "p3_chs": head.lateral_p3.in_channels,
             "embed_dims": embed_dims, "dim": head.dim, "roi_size": head.roi_size}  # fmt: skip
    record = {**meta, **sizes}
    save_bundle(folder / "mask_head.safetensors", head.state_dict(), folder / "mask_head.json", record)
    return folder / "mask_head.safetensors"


def load_mask_head(folder: str | os.PathLike) -> tuple[MaskHead, dict[str, Any]]:
    """The head saved by ``save_mask_head`` (eval mode) and its metadata."""
    from potpourri.core.io import load_bundle

    folder = Path(folder)
    meta, state = load_bundle(
        folder / "mask_head.safetensors",
        folder / "mask_head.json",
        missing=f"'{folder}' holds no mask_head.json; train one with `potpourri detect mask-train RUN`",
        fix="re-run `potpourri detect mask-train`",
    )
    head = MaskHead(meta["fine_chs"], meta["p3_chs"], meta["embed_dims"], meta["dim"], meta["roi_size"])
    head.load_state_dict(state)
    return head.eval(), meta


# ----------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def predict_instances(
    detector: nn.Module | FrozenDetector,
    head: MaskHead,
    images: Sequence[np.ndarray],
    *,
    conf: float = 0.05,
    iou: float = 0.6,
    max_det: int = 100,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> list[dict[str, np.ndarray]]:
    """Per image: detector ``boxes``, ``scores``, ``labels`` (its own post-processing: NMS for YOLO, none for a DETR)
    and binary ``masks`` (N, H, W) from the head, run on ``device`` (None: where the head is) under ``precision``."""
    from potpourri.core.training import check_precision
    from potpourri.detect.train import model_device

    device = model_device(head, device)
    check_precision(precision, device)
    head.to(device).eval()
    frozen = as_frozen(detector)
    frozen.module.to(device)
    results = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        with autocast(device, precision):
            out = frozen.outputs(_normalise(chunk, frozen))
            pixels = head.pixel_map(out.features[0], out.features[-1])
        height, width = chunk[0].shape[:2]
        for row in range(len(chunk)):
            boxes = clip_boxes(out, row)
            scores, labels = out.probs[row].max(-1)
            kept = frozen.detections(out, row, conf=conf, iou=iou, max_det=max_det)
            rows = torch.full((len(kept),), row, dtype=torch.long, device=device)
            if len(kept):
                with autocast(device, precision):
                    queries = head.queries(out.embeds, rows, kept)
                    rois = torch.cat([rows[:, None].float(), boxes[kept].float()], 1)
                    probs = head(pixels, rois, queries, stride=out.strides[0]).float().sigmoid()
                masks = paste_masks(probs, boxes[kept].float(), (height, width)) > 0.5
            else:
                masks = torch.zeros(0, height, width, dtype=torch.bool)
            results.append({"boxes": boxes[kept].float().cpu().numpy(), "scores": scores[kept].float().cpu().numpy(),
                            "labels": labels[kept].cpu().numpy(), "masks": masks.cpu().numpy()})  # fmt: skip
    return results


# ----------------------------------------------------------------------------------------------- metrics
def mask_coco_map(
    predictions: Sequence[dict[str, Any]], targets: Sequence[InstanceSample], num_classes: int
) -> dict[str, float]:
    """COCO mask ``map`` (0.5:0.95) and ``map50`` by ``pycocotools`` (``iouType="segm"``, RLE masks)."""
    from pycocotools import mask as mask_utils

    from potpourri.detect.train import require_pycocotools

    if len(predictions) != len(targets):
        raise PotpourriError(f"{len(predictions)} predictions for {len(targets)} images")
    coco_cls, eval_cls = require_pycocotools()

    def rle(m: np.ndarray) -> dict[str, Any]:
        encoded = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        encoded["counts"] = encoded["counts"].decode("ascii")
        return encoded

    images, annotations, results = [], [], []
    for image_id, (pred, target) in enumerate(zip(predictions, targets, strict=True), start=1):
        height, width = target.image.shape[:2]
        images.append({"id": image_id, "width": width, "height": height})
        for m, box, label in zip(target.masks, target.boxes.tolist(), target.labels.tolist(), strict=True):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                                "segmentation": rle(m), "area": float(m.sum()), "iscrowd": 0,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})  # fmt: skip
        for m, score, label in zip(pred["masks"], pred["scores"], pred["labels"], strict=True):
            results.append({"image_id": image_id, "category_id": int(label) + 1, "score": float(score),
                            "segmentation": rle(np.asarray(m))})  # fmt: skip
    if not annotations:
        return {"map": float("nan"), "map50": float("nan"), "detections": len(results)}
    if not results:
        return {"map": 0.0, "map50": 0.0, "detections": 0}
    truth = coco_cls()
    truth.dataset = {"images": images, "annotations": annotations,
                     "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)]}  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
        evaluator = eval_cls(truth, truth.loadRes(results), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map": float(evaluator.stats[0]), "map50": float(evaluator.stats[1]), "detections": len(results)}
