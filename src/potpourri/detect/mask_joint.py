"""Full fine-tuning, the arm Mask Frozen-DETR's frozen detector is compared against: our small DETR and the same mask
head trained jointly, end to end, from the initialisation the frozen arm's DETR and head start from.

Mask Frozen-DETR (arXiv 2308.03747) trains only a mask head on a frozen, already-trained DETR. Its counterfactual is
training detector and mask branch together. Here that is ``SmallDetr`` (``potpourri.detect.detr``) and ``MaskHead``
(``potpourri.detect.mask_head``) in one loop, with the ImageNet EfficientNet-Lite0 trunk frozen in both arms (the
frozen arm's DETR never trains it either), so "full" means: every weight the frozen arm trains in its two phases
trains here in one.

Exact recipe (each choice is the frozen arm's, unless said):
- **Initialisation**: ``torch.manual_seed(detr seed)`` then ``SmallDetr(cfg)``, ``torch.manual_seed(head seed)`` then
  ``MaskHead`` sized for the DETR: the same weights ``train_small_detr`` and ``train_mask_head`` start from.
- **Features**: Lite0 blocks.1 (stride 4, the head's fine map), blocks.2 and blocks.4 (the DETR's inputs), cached
  once for the images and their mirror images (with mirrored boxes and masks).
- **Step**: a batch of 8 images of one view; the DETR's loss (focal + 5·L1 + 2·GIoU on every decoder layer and on
  the two-stage proposals, ``detr_losses``) **+** the mask loss (BCE + Dice, weight 1) of every ground-truth
  instance, whose query is the one **Hungarian matching** assigns it on the current last-layer predictions (cost
  5·L1 − 2·GIoU − p(class), ``DetrFrozen.assign``'s), its RoI the ground-truth box jittered by ±10 %. The mask
  gradients reach the DETR through the encoder memory (the head's coarse map) and the matched queries' states.
- **Optimiser**: AdamW, two groups: the DETR at lr 2e-4, the head at lr 2e-3 (weight decay 1e-4 each); gradient
  clipping 0.1 on the DETR's parameters only (DETR's; the frozen arm's head is not clipped).
- **Schedules on the budget**: progress = max(step / ``max_steps``, CPU used / ``max_cpu_seconds``); the DETR's lr
  drops ×0.1 at progress 2/3 (``train_small_detr``'s drop at 2/3 of its steps), the head's lr follows a cosine over
  progress (``train_mask_head``'s over its steps). So a CPU-capped run gets both schedules complete.
- **Stop**: before a step, once ``max_cpu_seconds`` of this process's CPU time (``time.process_time``, counted from
  the call, the feature cache included) are spent, or after ``max_steps``. Not resumable: one call is a few
  CPU-minutes (the reproduction's budget), so a killed run is re-run.

Reading order: ``joint_initialisation`` → ``train_detr_and_mask_head``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from potpourri.core.errors import PotpourriError
from potpourri.core.training import TrainOptions
from potpourri.detect.detr import LiteDetr, SmallDetr, SmallDetrConfig, detr_losses, flipped_boxes, lite0_pyramids
from potpourri.detect.frozen import detr_match_cost, hungarian_match
from potpourri.detect.mask_head import InstanceSample, MaskHead, MaskHeadConfig, jitter_boxes, mask_losses, mask_targets

__all__ = ["joint_initialisation", "train_detr_and_mask_head"]


def joint_initialisation(
    detr_cfg: SmallDetrConfig, head_cfg: MaskHeadConfig, fine_channels: int
) -> tuple[SmallDetr, MaskHead]:
    """The DETR and the head as ``train_small_detr`` and ``train_mask_head`` (on that DETR) initialise them."""
    torch.manual_seed(detr_cfg.seed)
    detr = SmallDetr(detr_cfg)
    torch.manual_seed(head_cfg.seed)
    head = MaskHead(fine_channels, detr_cfg.dim, [detr_cfg.dim], head_cfg.dim, head_cfg.roi_size)
    return detr, head


def _views(samples: Sequence[InstanceSample], backbone: nn.Module, flip: bool) -> list[dict[str, Any]]:
    """Cached frozen Lite0 maps (strides 4, 8, 16) and the targets of the images and, with ``flip``, their mirrors."""
    images = [s.image for s in samples]
    size = images[0].shape[1]
    views = []
    for mirrored in (False, True) if flip else (False,):
        maps = lite0_pyramids(images, backbone, flip=mirrored, levels=(0, 1, 2))
        targets = []
        for s in samples:
            boxes = flipped_boxes(s.boxes, size) if mirrored else s.boxes
            masks = np.ascontiguousarray(s.masks[:, :, ::-1]) if mirrored else s.masks
            targets.append((torch.as_tensor(boxes, dtype=torch.float32), torch.as_tensor(s.labels),
                            torch.from_numpy(masks)))  # fmt: skip
        views.append({"maps": maps, "targets": targets})
    return views


def _mask_loss(
    head: MaskHead,
    out: dict[str, torch.Tensor],
    fine: torch.Tensor,
    targets: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    image_size: int,
    head_cfg: MaskHeadConfig,
    generator: torch.Generator,
    amp: Any,
) -> torch.Tensor | None:
    """BCE + Dice of every ground-truth instance of the batch, each on its Hungarian-matched query; None if none."""
    from torchvision.ops import box_convert

    boxes_px = box_convert(out["boxes"][-1].detach().float(), "cxcywh", "xyxy") * image_size  # (B, Q, 4)
    probs = out["logits"][-1].detach().float().sigmoid()  # (B, Q, K)
    rois, queries, rows, mask_goals = [], [], [], []
    for row, (gt_boxes, gt_labels, gt_masks) in enumerate(targets):
        if len(gt_boxes) == 0:
            continue
        cost = detr_match_cost(boxes_px[row], probs[row], gt_boxes, gt_labels, (image_size, image_size))
        gt_index, query = hungarian_match(cost)
        if len(gt_index) == 0:
            continue
        boxes = jitter_boxes(gt_boxes[gt_index], head_cfg.jitter, (image_size, image_size), generator)
        rois.append(torch.cat([torch.full((len(boxes), 1), float(row)), boxes], 1))
        queries.append(query)
        rows.append(torch.full((len(boxes),), row, dtype=torch.long))
        mask_goals.append(mask_targets(gt_masks[gt_index], boxes, head.roi_size))
    if not rois:
        return None
    with amp():
        pixels = head.pixel_map(fine, out["memory"])  # (B, dim, H/4, W/4)
        query_vectors = head.queries([out["hidden"]], torch.cat(rows), torch.cat(queries))  # (K, dim)
        logits = head(pixels, torch.cat(rois), query_vectors, stride=image_size / fine.shape[-1])  # (K, S, S)
    return mask_losses(logits.float(), torch.cat(mask_goals))["total"]


def train_detr_and_mask_head(
    samples: Sequence[InstanceSample],
    detr_cfg: SmallDetrConfig,
    head_cfg: MaskHeadConfig,
    *,
    backbone: nn.Module,
    max_steps: int,
    max_cpu_seconds: float | None = None,
    options: TrainOptions | None = None,
) -> tuple[LiteDetr, MaskHead, dict[str, Any]]:
    """Train ``SmallDetr`` and ``MaskHead`` jointly on frozen ``backbone`` (``Lite0Backbone``) features until
    ``max_steps`` or ``max_cpu_seconds`` of this process's CPU (module doc); the detector, the head, the history.

    Example:
        detector, head, history = train_detr_and_mask_head(train, SmallDetrConfig(), MaskHeadConfig(),
                                                           backbone=Lite0Backbone(pretrained=True), max_steps=2000)
    """
    from potpourri.core.training import Trainer

    if not samples:
        raise PotpourriError("no training samples for the joint DETR + mask head")
    size = samples[0].image.shape[0]
    if any(s.image.shape[:2] != (size, size) for s in samples):
        raise PotpourriError("joint training needs square images of one size; resize the samples first")
    cpu_start, start = time.process_time(), time.perf_counter()
    options = options or TrainOptions()
    options = replace(options, progress=options.progress and detr_cfg.progress, grad_clip=detr_cfg.grad_clip,
                      resume=False, checkpoint_every=0)  # fmt: skip
    backbone.eval().requires_grad_(False)
    detr, head = joint_initialisation(detr_cfg, head_cfg, backbone.fine_channels)
    model = nn.ModuleDict({"detr": detr, "head": head})
    optimizer = torch.optim.AdamW(
        [{"params": list(detr.parameters()), "lr": detr_cfg.lr, "weight_decay": detr_cfg.weight_decay},
         {"params": list(head.parameters()), "lr": head_cfg.lr, "weight_decay": head_cfg.weight_decay}],
    )  # fmt: skip
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    trainer = Trainer(model, optimizer, total_steps=max_steps, options=options, params=list(detr.parameters()),
                      desc="detr + mask head")  # fmt: skip
    backbone.to(trainer.device)
    rng = np.random.default_rng(detr_cfg.seed)
    generator = torch.Generator().manual_seed(head_cfg.seed)
    views = _views(samples, backbone, detr_cfg.flip)
    cache_cpu_s = time.process_time() - cpu_start
    detr_losses_seen: list[float] = []
    mask_losses_seen: list[float] = []
    step_cpu_s: list[float] = []
    model.train()
    for step in trainer.steps():
        used = time.process_time() - cpu_start
        if max_cpu_seconds is not None and used >= max_cpu_seconds:
            break
        step_start = time.process_time()
        progress = max(step / max_steps, used / max_cpu_seconds if max_cpu_seconds else 0.0)
        optimizer.param_groups[0]["lr"] = base_lrs[0] * (1.0 if progress < 2 / 3 else 0.1)
        optimizer.param_groups[1]["lr"] = base_lrs[1] * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        view = views[int(rng.integers(len(views)))]
        picks = rng.choice(len(samples), size=min(detr_cfg.batch_size, len(samples)), replace=False).tolist()
        index = torch.as_tensor(picks, device=trainer.device)
        fine, mid, coarse = (m[index] for m in view["maps"])
        with trainer.autocast():
            out = detr(mid, coarse)
        targets = [tuple(t.to(trainer.device) for t in view["targets"][i]) for i in picks]
        boxes_only = [(t[0], t[1]) for t in targets]
        loss = detr_losses(out["logits"].float(), out["boxes"].float(), boxes_only, size)["total"]
        loss = loss + detr_losses(out["proposal_logits"][None].float(), out["proposal_boxes"][None].float(),
                                  boxes_only, size)["total"]  # fmt: skip
        mask = _mask_loss(head, out, fine, targets, size, head_cfg, generator, trainer.autocast)
        detr_losses_seen.append(float(loss.detach()))
        mask_losses_seen.append(float(mask.detach()) if mask is not None else math.nan)
        trainer.update(loss + mask if mask is not None else loss)
        step_cpu_s.append(time.process_time() - step_start)
    trainer.finish()
    history = {"steps": trainer.step, "cpu_s": time.process_time() - cpu_start, "wall_s": time.perf_counter() - start,
               "cache_cpu_s": cache_cpu_s, "max_step_cpu_s": max(step_cpu_s, default=0.0),
               "detr_losses": detr_losses_seen, "mask_losses": mask_losses_seen,
               "detr_params": sum(p.numel() for p in detr.parameters()),
               "head_params": sum(p.numel() for p in head.parameters())}  # fmt: skip
    return LiteDetr(backbone, detr.eval()).eval(), head.eval(), history
