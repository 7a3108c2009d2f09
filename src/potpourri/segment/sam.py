"""Promptable defect segmentation with the Segment Anything architecture (Kirillov et al., 2023), small and on CPU.

Reading order: prompt encoder (random-Fourier positional encoding, point-type embeddings) → two-way transformer →
mask decoder (output tokens, hypernetwork MLPs, IoU head) → image encoder (frozen EfficientNet-Lite0 to stride 16,
projected by a SAM-style neck) → ``Sam`` → prompt sampling and losses → ``train_sam`` / ``evaluate_sam`` → the
official-checkpoint path (``segment_anything`` key layout, ``sam_vit_b.pth`` / ``mobile_sam.pt``).

Module and parameter names of ``prompt_encoder.*`` and ``mask_decoder.*`` are those of ``segment_anything``, so an
official checkpoint's prompt encoder and mask decoder load into ours unchanged (at width 256).

Example:
    >>> sam = Sam(SamConfig(prompt_dim=32), backbone=None)  # doctest: +SKIP
    >>> masks, iou = sam(images, points=pts, labels=lbl)  # (B, 3, H/4, W/4), (B, 3)  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from potpourri.core.errors import PotpourriError
from potpourri.core.training import Trainer, TrainOptions, autocast, resolve_device
from potpourri.models.layers import binary_focal_loss, soft_dice
from potpourri.models.sam import Sam, SamConfig

__all__ = [
    "check_resumable",
    "continue_metrics",
    "evaluate_sam",
    "sam_loss",
    "train_sam",
]


# ----------------------------------------------------------------------------------------------- prompts, losses
def regions(mask: np.ndarray, min_pixels: int = 16) -> list[np.ndarray]:
    """Binary masks of the defect regions of a class-id mask: one per class present with ``min_pixels`` or more."""
    return [mask == c for c in np.unique(mask) if c != 0 and (mask == c).sum() >= min_pixels]


def box_of(region: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(region)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def centre_click(region: np.ndarray) -> np.ndarray:
    """The pixel of ``region`` farthest from its boundary (the usual first click of interactive evaluation)."""
    dist = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([x, y], np.float32)


def next_click(pred: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, int]:
    """Corrective click at the centre of the largest error: positive on missed pixels, negative on false ones."""
    missed, false = region & ~pred, pred & ~region
    error = missed if missed.sum() >= false.sum() else false
    if not error.any():
        return centre_click(region), 1
    components, count = ndimage.label(error)
    sizes = ndimage.sum(error, components, range(1, count + 1))
    largest = components == (1 + int(np.argmax(sizes)))
    return centre_click(largest), int(error is missed)


def sample_prompt(region: np.ndarray, rng: np.random.Generator, kind: str) -> dict[str, np.ndarray]:
    """A training prompt from a ground-truth region: "point" (one positive), "points" (2–3 mixed) or "box"."""
    ys, xs = np.nonzero(region)
    if kind == "box":  # SAM's box noise: 10% of the side, at most 20 px
        box = box_of(region)
        side = np.array([box[2] - box[0], box[3] - box[1]] * 2, np.float32)
        noise = rng.normal(0, 1, 4) * np.minimum(0.1 * side, 20)
        box = np.clip(box + noise, 0, region.shape[0] - 1).astype(np.float32)
        return {"boxes": np.array([min(box[0], box[2]), min(box[1], box[3]), max(box[0], box[2]), max(box[1], box[3])])}
    count = 1 if kind == "point" else int(rng.integers(2, 4))
    points, labels = [], []
    x0, y0, x1, y1 = box_of(region)
    pad = 0.25 * max(x1 - x0, y1 - y0) + 4
    for i in range(count):
        if i == 0 or rng.random() < 0.6:
            j = int(rng.integers(len(ys)))
            points.append((xs[j], ys[j]))
            labels.append(1)
        else:  # a negative click near the region
            for _ in range(20):
                x = rng.uniform(x0 - pad, x1 + pad)
                y = rng.uniform(y0 - pad, y1 + pad)
                xi, yi = int(np.clip(x, 0, region.shape[1] - 1)), int(np.clip(y, 0, region.shape[0] - 1))
                if not region[yi, xi]:
                    break
            points.append((xi, yi))
            labels.append(0)
    return {"points": np.array(points, np.float32), "labels": np.array(labels, np.int64)}


def prompt_mask_loss(logits: torch.Tensor, target: torch.Tensor, *, focal_weight: float = 20.0) -> torch.Tensor:
    """SAM's per-mask loss: focal·w + (1 - soft Dice) of (B, M, S, S) logits against 0/1 targets -> (B, M)."""
    dice = soft_dice(torch.sigmoid(logits).flatten(2), target.flatten(2), -1)
    return focal_weight * binary_focal_loss(logits, target) + (1 - dice)


def sam_loss(
    logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, *, focal_weight: float = 20.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """SAM's loss: focal·w + dice on the best of the M masks only, plus MSE of predicted IoU against actual IoU.

    ``logits`` (B, M, S, S) at the target's resolution, ``target`` (B, 1, S, S) in {0, 1}.
    """
    target = target.expand_as(logits)
    mask_loss = prompt_mask_loss(logits, target, focal_weight=focal_weight)  # (B, M)
    best = mask_loss.argmin(dim=1)  # SAM backpropagates only the lowest-loss mask of an ambiguous prompt
    rows = torch.arange(len(best), device=best.device)
    with torch.no_grad():
        pred = logits > 0
        inter = (pred & (target > 0.5)).flatten(2).sum(-1).float()
        union = (pred | (target > 0.5)).flatten(2).sum(-1).float()
        iou = inter / union.clamp(min=1)  # (B, M)
    iou_loss = F.mse_loss(iou_pred, iou)
    loss = mask_loss[rows, best].mean() + iou_loss
    return loss, {"mask": float(mask_loss[rows, best].mean().detach()), "iou_mse": float(iou_loss.detach())}


# ----------------------------------------------------------------------------------------------- data
def synth_regions(
    split: str, per_category: int, *, size: int, seed: int = 0, multi_share: float = 0.5,
    categories=("brick", "grass", "gravel"), version: str = "1",
):  # fmt: skip
    """DS-Synth defect images → images (N, S, S, 3) and (image index, region) pairs; ``multi_share`` of the images
    hold 2–3 defects, so that the prompt, not the image alone, says which region is meant (``version``: DS-Synth)."""
    from potpourri.data.synth import DEFECTS, MULTI, make_samples

    n_multi = round(per_category * multi_share)
    images, items = [], []
    for category in categories:
        samples = make_samples(category, split, per_category - n_multi, seed=seed, size=size, kinds=DEFECTS,
                               version=version)  # fmt: skip
        samples += make_samples(category, split, n_multi, seed=seed, size=size, kinds=(MULTI,), version=version)
        for sample in samples:
            for region in regions(sample.mask):
                items.append((len(images), region))
            images.append(sample.image)
    return np.stack(images), items


# ----------------------------------------------------------------------------------------------- train / evaluate
def _batch_prompts(prompts: list[dict[str, np.ndarray]], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    if "boxes" in prompts[0]:
        return {"boxes": torch.from_numpy(np.stack([p["boxes"] for p in prompts])).to(device)}
    return {
        "points": torch.from_numpy(np.stack([p["points"] for p in prompts])).to(device),
        "labels": torch.from_numpy(np.stack([p["labels"] for p in prompts])).to(device),
    }


def _upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def check_resumable(out: str | os.PathLike | None, options: TrainOptions | None) -> None:
    """With ``options.resume``, ``out`` must be a run folder that holds checkpoints (one clear error otherwise)."""
    if options is None or not options.resume:
        return
    if out is None:
        raise PotpourriError("--resume continues the run in --out; give --out RUN")
    if not (Path(out) / "checkpoints").is_dir():
        raise PotpourriError(f"no checkpoint to resume in '{out}'; run without --resume first")


def continue_metrics(run: Any, resume: bool) -> Callable[[dict[str, Any]], None]:
    """``run.log_metrics``; a resumed run first keeps the rows logged before the (stage, step) of its first new row,
    so ``metrics.csv`` reads as one uninterrupted run."""
    path = run.path / "metrics.csv"
    if not resume or not path.is_file():
        return run.log_metrics
    with open(path, newline="") as fh:
        pending = [list(csv.DictReader(fh))]

    def log(row: dict[str, Any]) -> None:
        if pending:
            old = pending.pop()
            for kept in old:
                if str(kept.get("stage", "")) == str(row.get("stage", "")) and int(kept["step"]) >= row["step"]:
                    break
                run.log_metrics(kept)
        run.log_metrics(row)

    return log


def train_sam(
    sam: Sam,
    images: np.ndarray,
    items: list[tuple[int, np.ndarray]],
    *,
    progress: bool = True,
    log=None,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> list[float]:
    """Train prompt encoder and mask decoder (and the neck if ``train_neck``) on regions with sampled prompts.

    ``options`` (device, precision, resume, ...) and ``checkpoints`` (a folder) go to ``core.training.Trainer``.
    """
    cfg = sam.config
    options = options or TrainOptions(progress=progress)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, cfg.steps // 20)  # linear warm-up, then cosine decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))
    )
    trainer = Trainer(sam, optimizer, total_steps=cfg.steps, options=options, folder=checkpoints,
                      schedulers={"lr": scheduler}, generators={"prompts": rng}, desc="sam-train")  # fmt: skip
    device = trainer.device
    features = sam.backbone_features(images)
    losses = trainer.state.setdefault("losses", [])
    sam.train()
    for step in trainer.steps():
        kind = ("point", "points", "box")[step % 3]  # one prompt kind per batch: the token count is fixed
        chosen = rng.integers(len(items), size=cfg.batch_size)
        if kind == "points":
            count = int(rng.integers(2, 4))
            prompts = [sample_prompt(items[j][1], rng, "points") for j in chosen]
            prompts = [
                {"points": np.resize(p["points"], (count, 2)), "labels": np.resize(p["labels"], count)} for p in prompts
            ]
        else:
            prompts = [sample_prompt(items[j][1], rng, kind) for j in chosen]
        # every process samples the global batch's prompts (one generator state), then keeps its slice (torchrun);
        # the loss is a mean over regions, so the slices' shares add up to the global batch's loss
        local, share = trainer.shard(list(range(len(chosen))))
        chosen, prompts = [chosen[i] for i in local], [prompts[i] for i in local]
        target = torch.from_numpy(np.stack([items[j][1] for j in chosen])).float()[:, None].to(device)  # (B,1,S,S)
        inputs = features[[items[j][0] for j in chosen]]
        with trainer.autocast():
            logits, iou_pred = sam.decode(inputs, **_batch_prompts(prompts, device), multimask_output=kind == "point")
        loss, parts = sam_loss(_upsample(logits.float(), cfg.image_size), iou_pred.float(), target,
                               focal_weight=cfg.focal_weight)  # fmt: skip
        loss = loss * share
        losses.append(trainer.mean_over_processes(float(loss.detach())))  # before update: its checkpoint holds it
        trainer.update(loss)
        if log is not None and (step % 100 == 0 or step == cfg.steps - 1):
            log({"step": step, "loss": losses[-1], **parts})
    trainer.finish()
    sam.eval()
    return list(losses)


@torch.no_grad()
def predict_mask(sam: Sam, features: torch.Tensor, prompt: dict[str, np.ndarray]) -> np.ndarray:
    """One (S, S) bool mask for one image's features (1, C, h, w); a single click takes the best-predicted of 3.
    Runs on the features' device, under any autocast the caller entered."""
    single_click = "points" in prompt and len(prompt["points"]) == 1
    prompts = _batch_prompts([prompt], features.device)
    logits, iou_pred = sam.decode(features, **prompts, multimask_output=single_click)
    best = int(iou_pred[0].argmax())
    return (_upsample(logits[:, best : best + 1].float(), sam.config.image_size)[0, 0] > 0).cpu().numpy()


def _iou(pred: np.ndarray, target: np.ndarray) -> float:
    return float((pred & target).sum() / max(1, (pred | target).sum()))


@torch.no_grad()
def evaluate_sam(
    sam: Sam,
    images: np.ndarray,
    items: list[tuple[int, np.ndarray]],
    *,
    progress: bool = True,
    device: str | torch.device | None = None,
    precision: str = "fp32",
):
    """mIoU over regions for 1 centre click, 3 clicks (2 corrective), the tight box; and the box-fill baseline.

    ``device`` (``auto``, ``cpu``, ``cuda[:N]``; default: where the SAM is) and ``precision`` (fp32, bf16, fp16)."""
    from tqdm import tqdm

    if device is not None:
        sam.to(resolve_device(device) if isinstance(device, str) else device)
    sam.eval()
    scores: dict[str, list[float]] = {"1 click": [], "3 clicks": [], "box": [], "box filled (baseline)": []}
    with autocast(sam.pixel_mean.device, precision):
        features = sam.backbone_features(images)
        for index, region in tqdm(items, disable=not progress, desc="sam-eval"):
            feats = features[index : index + 1]
            points, labels = [centre_click(region)], [1]
            pred = predict_mask(sam, feats, {"points": np.stack(points), "labels": np.array(labels)})
            scores["1 click"].append(_iou(pred, region))
            for _ in range(2):
                point, label = next_click(pred, region)
                points.append(point)
                labels.append(label)
                pred = predict_mask(sam, feats, {"points": np.stack(points), "labels": np.array(labels)})
            scores["3 clicks"].append(_iou(pred, region))
            box = box_of(region)
            scores["box"].append(_iou(predict_mask(sam, feats, {"boxes": box}), region))
            filled = np.zeros_like(region)
            filled[int(box[1]) : int(box[3]) + 1, int(box[0]) : int(box[2]) + 1] = True
            scores["box filled (baseline)"].append(_iou(filled, region))
    return {name: float(np.mean(v)) for name, v in scores.items()} | {"regions": len(items)}


def run_sam_experiment(
    *,
    out: str | os.PathLike | None = None,
    per_category: int = 100,
    test_per_category: int = 20,
    config: SamConfig | None = None,
    progress: bool = True,
    options: TrainOptions | None = None,
) -> dict[str, Any]:
    """Train on DS-Synth training rows, evaluate on held-out rows, save the run and return its summary.

    ``options``: device, precision, checkpoints every N steps (in ``<run>/checkpoints``), resume the run in ``out``.
    Backbone ``"none"`` builds the tiny random stand-in encoder (tests)."""
    from potpourri.core.registry import create_model
    from potpourri.core.runs import new_run

    config = config or SamConfig()
    options = options or TrainOptions(progress=progress)
    check_resumable(out, options)
    torch.manual_seed(config.seed)
    run = new_run(
        "sam",
        out,
        config={**asdict(config), "per_category": per_category, "test_per_category": test_per_category},
        seed=config.seed,
    )
    start = time.perf_counter()
    backbone = None if config.backbone == "none" else create_model(config.backbone, pretrained=True)
    sam = Sam(config, backbone=backbone)
    train_images, train_items = synth_regions("train", per_category, size=config.image_size, seed=config.seed)
    test_images, test_items = synth_regions("test", test_per_category, size=config.image_size, seed=config.seed)
    frozen = {k: v.clone() for k, v in sam.image_encoder.backbone.state_dict().items()}
    losses = train_sam(sam, train_images, train_items, log=continue_metrics(run, options.resume), options=options,
                       checkpoints=run.path / "checkpoints")  # fmt: skip
    train_s = time.perf_counter() - start
    same = all(torch.equal(frozen[k], v.cpu()) for k, v in sam.image_encoder.backbone.state_dict().items())
    metrics = evaluate_sam(sam, test_images, test_items, progress=options.progress, precision=options.precision)
    sam.cpu().save(run.path)
    summary = {
        "metrics": metrics,
        "train_regions": len(train_items),
        "train_images": len(train_images),
        "test_images": len(test_images),
        "first_loss": float(np.mean(losses[:30])),
        "last_loss": float(np.mean(losses[-30:])),
        "backbone_unchanged": same,
        "trainable_params": sum(p.numel() for p in sam.parameters() if p.requires_grad),
        "train_s": round(train_s, 1),
        "total_s": round(time.perf_counter() - start, 1),
    }
    run.write_summary(summary)
    return summary | {"run": str(run.path)}
