"""A small DETR on frozen ImageNet EfficientNet-Lite0 features: the detector Mask Frozen-DETR's head sits on here.

Our own toy DETR (Carion et al., arXiv 2005.12872), with three convergence aids of its successors so that it learns
in CPU-minutes: two-stage query selection (Deformable DETR, DINO), reference boxes refined layer by layer with the
query position taken from the box (DAB-DETR, arXiv 2201.12329; Deformable DETR's iterative refinement) and a sigmoid
focal class loss (Deformable DETR) instead of a softmax with a no-object class. Reading order: ``SmallDetrConfig`` →
``SmallDetr`` (the transformer on cached features) → ``detr_losses`` (Hungarian matching, focal + L1 + GIoU on every
decoder layer and on the proposals) → ``train_small_detr`` (cached Lite0 features of the images and of their mirror
images, resumable ``Trainer`` loop with a time cap) → ``LiteDetr`` / ``LiteDetrFrozen`` (backbone + DETR behind the
``FrozenDetector`` contract) → save / load.

Exact design (defaults of ``SmallDetrConfig``):
- **Features**: Lite0 ``blocks.2`` (stride 8, 40 ch) and ``blocks.4`` (stride 16, 112 ch), frozen (eval, no grad),
  computed once per training image. The stride-8 map goes space-to-depth to stride 16 (4·40 ch, so no detail is
  averaged away), is concatenated with the stride-16 map and a 1×1 conv maps both to ``dim`` = 128; + a 2-D sine
  position, one transformer encoder layer (FFN 256) gives the stride-16 "encoder memory" (also what the mask head
  sees), to which the decoder cross-attends. One level of 256 tokens at 256 px, not two: the keys and values of a
  1,280-token memory made a CPU step 3× slower.
- **Two-stage query selection** (Deformable DETR's two-stage, DINO's "mixed" queries): every memory token proposes
  class logits and a box (a delta on a prior box of side 1/8 centred on its cell); the 16 top-scoring proposals
  (detached) are the decoder's reference boxes, with learned content vectors. A learned-only reference set learned
  nothing useful in 440 steps (box mAP50 0.007), which is why.
- **Decoder**: 16 queries, 3 post-norm layers (self-attention, cross-attention, FFN 512, 4 heads). A query's
  position embedding is an MLP of its reference box's sine encoding. Each layer predicts class logits and a box
  delta in inverse-sigmoid space; the refined box (detached) is the next layer's reference.
- **Loss** per decoder layer and on the proposals, summed: Hungarian matching
  (``potpourri.detect.frozen.detr_match_cost``: 5·L1 − 2·GIoU − 2·p(class)) then sigmoid focal loss (α 0.25, γ 2,
  weight 2) + 5·L1 (normalised cxcywh) + 2·GIoU over the matched pairs, each divided by the number of ground-truth
  boxes in the batch.
- **Training**: AdamW lr 2e-4, weight decay 1e-4, batch 8, gradient clip 0.1 (DETR), lr ×0.1 for the last third
  of ``max_steps``; horizontal flips as a second cached copy of the features; ``max_seconds`` caps one invocation
  and a resumed one continues from the last checkpoint.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.training import TrainOptions
from potpourri.detect.frozen import DetectorOutputs, DetrFrozen, detr_match_cost, hungarian_match

__all__ = [
    "LiteDetr",
    "LiteDetrFrozen",
    "SmallDetr",
    "SmallDetrConfig",
    "detr_losses",
    "flipped_boxes",
    "lite0_pyramids",
    "load_lite_detr",
    "predict_boxes",
    "save_lite_detr",
    "train_small_detr",
]

MEAN = STD = (0.5, 0.5, 0.5)  # EfficientNet-Lite0 normalisation


@dataclass
class SmallDetrConfig:
    """Sizes of the small DETR and its training recipe."""

    num_classes: int = 6
    dim: int = 128
    heads: int = 4
    queries: int = 16
    encoder_layers: int = 1
    decoder_layers: int = 3
    ffn: int = 512
    encoder_ffn: int = 256
    in_channels: tuple[int, int] = (40, 112)  # Lite0 blocks.2 (stride 8), blocks.4 (stride 16)
    lr: float = 2e-4
    weight_decay: float = 1e-4
    batch_size: int = 8
    max_steps: int = 3000
    max_seconds: float | None = None
    grad_clip: float = 0.1
    flip: bool = True
    seed: int = 0
    progress: bool = True


# ----------------------------------------------------------------------------------------------- model
def sine_grid(height: int, width: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """2-D sine position embedding (H·W, dim) of a grid's cell centres in [0, 1] (DETR's, normalised)."""
    ys, xs = torch.meshgrid((torch.arange(height, device=device) + 0.5) / height,
                            (torch.arange(width, device=device) + 0.5) / width, indexing="ij")  # fmt: skip
    return sine_coords(torch.stack([xs.flatten(), ys.flatten()], -1), dim)


def sine_coords(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """Sine encoding (..., dim) of coordinates (..., C) in [0, 1]: dim/C features per coordinate, half sin half cos."""
    per = dim // coords.shape[-1]
    freqs = 10000 ** (torch.arange(per // 2, device=coords.device, dtype=torch.float32) * 2 / per)
    angles = coords[..., None].float() * 2 * math.pi / freqs  # (..., C, per/2)
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)


def _mlp(in_dim: int, hidden: int, out_dim: int, layers: int) -> nn.Sequential:
    dims = [in_dim] + [hidden] * (layers - 1)
    mods: list[nn.Module] = []
    for a, b in itertools.pairwise(dims):
        mods += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(dims[-1], out_dim))


class DecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: self-attention, cross-attention to the memory, FFN."""

    def __init__(self, dim: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))

    def forward(self, tgt: torch.Tensor, pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor):
        q = tgt + pos  # (B, Q, d)
        tgt = self.norms[0](tgt + self.self_attn(q, q, tgt, need_weights=False)[0])
        tgt = self.norms[1](tgt + self.cross_attn(tgt + pos, memory + memory_pos, memory, need_weights=False)[0])
        return self.norms[2](tgt + self.ffn(tgt))  # (B, Q, d)


class SmallDetr(nn.Module):
    """The transformer of our small DETR on two feature maps (module doc); tensors in, tensors out."""

    def __init__(self, cfg: SmallDetrConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        fine_chs, coarse_chs = cfg.in_channels
        self.proj = nn.Conv2d(4 * fine_chs + coarse_chs, d, 1)  # stride-8 map space-to-depth ⊕ stride-16 map
        layer = nn.TransformerEncoderLayer(d, cfg.heads, cfg.encoder_ffn, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.encoder_layers, enable_nested_tensor=False)
        self.decoder = nn.ModuleList(DecoderLayer(d, cfg.heads, cfg.ffn) for _ in range(cfg.decoder_layers))
        self.content = nn.Embedding(cfg.queries, d)
        self.box_pos = _mlp(d, d, d, 2)
        self.class_head = nn.Linear(d, cfg.num_classes)
        self.box_head = _mlp(d, d, 4, 3)
        self.proposal_class = nn.Linear(d, cfg.num_classes)  # two-stage: every memory token proposes a box
        self.proposal_box = _mlp(d, d, 4, 3)
        for head in (self.class_head, self.proposal_class):
            nn.init.constant_(head.bias, -math.log((1 - 0.01) / 0.01))  # focal-loss prior 0.01
        for mlp in (self.box_head, self.proposal_box):
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logits`` (L, B, Q, K) and ``boxes`` (L, B, Q, 4) normalised cxcywh per decoder layer, the last layer's
        ``hidden`` (B, Q, d), the encoded coarse map ``memory`` (B, d, h, w) and the two-stage ``proposal_logits``
        (B, h·w, K) / ``proposal_boxes`` (B, h·w, 4), from (B, C_i, h_i, w_i) maps."""
        d = self.cfg.dim
        x = self.proj(torch.cat([F.pixel_unshuffle(fine, 2), coarse], 1))  # (B, d, h, w) at stride 16
        h, w = x.shape[-2:]
        memory_pos = sine_grid(h, w, d, x.device)[None]  # (1, h·w, d)
        memory = self.encoder(x.flatten(2).transpose(1, 2) + memory_pos)  # (B, h·w, d)
        batch = len(fine)
        # two-stage: each token proposes a box around its cell (prior side 1/8 of the image); the top-Q proposals by
        # class score are the decoder's reference boxes (Deformable DETR's two-stage, DINO's query selection)
        ys, xs = torch.meshgrid((torch.arange(h, device=x.device) + 0.5) / h,
                                (torch.arange(w, device=x.device) + 0.5) / w, indexing="ij")  # fmt: skip
        prior = torch.stack(
            [xs.flatten(), ys.flatten(), torch.full_like(xs.flatten(), 0.125), torch.full_like(xs.flatten(), 0.125)], -1
        )  # (h·w, 4) fmt: skip
        proposal_logits = self.proposal_class(memory)  # (B, h·w, K)
        proposal_boxes = (torch.logit(prior, eps=1e-5) + self.proposal_box(memory)).sigmoid()  # (B, h·w, 4)
        top = proposal_logits.max(-1).values.topk(min(self.cfg.queries, h * w), dim=1).indices  # (B, Q)
        reference = proposal_boxes.gather(1, top[..., None].expand(-1, -1, 4)).detach()  # (B, Q, 4)
        tgt = self.content.weight[None, : top.shape[1]].expand(batch, -1, -1)  # (B, Q, d)
        all_logits, all_boxes = [], []
        for layer in self.decoder:
            pos = self.box_pos(sine_coords(reference, d))
            tgt = layer(tgt, pos, memory, memory_pos.expand(batch, -1, -1))
            boxes = (torch.logit(reference, eps=1e-5) + self.box_head(tgt)).sigmoid()
            all_logits.append(self.class_head(tgt))
            all_boxes.append(boxes)
            reference = boxes.detach()
        return {"logits": torch.stack(all_logits), "boxes": torch.stack(all_boxes), "hidden": tgt,
                "memory": memory.transpose(1, 2).reshape(batch, d, h, w),
                "proposal_logits": proposal_logits, "proposal_boxes": proposal_boxes}  # fmt: skip


# ----------------------------------------------------------------------------------------------- losses
def detr_losses(
    logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[tuple[torch.Tensor, torch.Tensor]], image_size: int
) -> dict[str, torch.Tensor]:
    """Focal + 5·L1 + 2·GIoU (class weight 2) summed over layers, after Hungarian matching per layer and image.

    ``logits`` (L, B, Q, K), ``boxes`` (L, B, Q, 4) normalised cxcywh, ``targets[b]`` = (xyxy px boxes, labels)."""
    from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

    num_boxes = max(1, sum(len(t[0]) for t in targets))
    cls_sum = l1_sum = giou_sum = logits.new_zeros(())
    for layer_logits, layer_boxes in zip(logits, boxes, strict=True):
        onehot = torch.zeros_like(layer_logits)
        for b, (gt_boxes, gt_labels) in enumerate(targets):
            if len(gt_boxes) == 0:
                continue
            pred_px = box_convert(layer_boxes[b], "cxcywh", "xyxy") * image_size
            with torch.no_grad():
                cost = detr_match_cost(pred_px, layer_logits[b].sigmoid(), gt_boxes, gt_labels,
                                       (image_size, image_size), cls=2.0)  # fmt: skip
            rows, cols = hungarian_match(cost)
            onehot[b, cols, gt_labels[rows]] = 1.0
            matched = layer_boxes[b, cols]
            gt_norm = box_convert(gt_boxes[rows] / image_size, "xyxy", "cxcywh")
            l1_sum = l1_sum + F.l1_loss(matched, gt_norm, reduction="sum")
            giou = torch.diag(generalized_box_iou(pred_px[cols], gt_boxes[rows]))
            giou_sum = giou_sum + (1 - giou).sum()
        cls_sum = cls_sum + sigmoid_focal_loss(layer_logits, onehot, alpha=0.25, gamma=2.0, reduction="sum")
    cls, l1, giou = cls_sum / num_boxes, l1_sum / num_boxes, giou_sum / num_boxes
    return {"cls": cls, "l1": l1, "giou": giou, "total": 2 * cls + 5 * l1 + 2 * giou}


# ----------------------------------------------------------------------------------------------- features
@torch.no_grad()
def lite0_pyramids(
    images: Sequence[np.ndarray],
    backbone: nn.Module,
    *,
    batch_size: int = 16,
    flip: bool = False,
    levels: Sequence[int] = (1, 2),
) -> list[torch.Tensor]:
    """Frozen Lite0 maps of (H, W, 3) uint8 images (mirrored left-right first with ``flip``), fp32 on the backbone's
    device: ``levels`` index ``forward_pyramid`` (0: blocks.1 stride 4, 1: blocks.2 (N, 40, H/8, W/8), 2: blocks.4
    (N, 112, H/16, W/16), 3: blocks.6)."""
    from potpourri.data.transforms import images_to_tensor

    device = next(backbone.parameters()).device
    maps: list[list[torch.Tensor]] = [[] for _ in levels]
    for start in range(0, len(images), batch_size):
        chunk = [im[:, ::-1] if flip else im for im in images[start : start + batch_size]]
        x = images_to_tensor([np.ascontiguousarray(c) for c in chunk], MEAN, STD).contiguous().to(device)
        pyramid = backbone.forward_pyramid(x)
        for out, level in zip(maps, levels, strict=True):
            out.append(pyramid[level])
    return [torch.cat(m) for m in maps]


def flipped_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """xyxy ``boxes`` (N, 4) of an image of ``width`` mirrored left-right."""
    out = boxes.copy()
    out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return out


# ----------------------------------------------------------------------------------------------- training
def train_small_detr(
    samples: Sequence[Any],
    cfg: SmallDetrConfig,
    *,
    backbone: nn.Module,
    model: SmallDetr | None = None,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> tuple[SmallDetr, dict[str, Any]]:
    """Train a ``SmallDetr`` on frozen ``backbone`` (``Lite0Backbone``) features of ``samples`` (image, boxes,
    labels); resumable from ``checkpoints`` with ``options.resume``; stops after ``cfg.max_seconds``."""
    from potpourri.core.training import Trainer

    if not samples:
        raise PotpourriError("no training samples for the DETR")
    size = samples[0].image.shape[0]
    if any(s.image.shape[:2] != (size, size) for s in samples):
        raise PotpourriError("the DETR trains on square images of one size; resize the samples first")
    options = replace(options or TrainOptions(), progress=(options or TrainOptions()).progress and cfg.progress,
                      grad_clip=cfg.grad_clip)  # fmt: skip
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    model = model or SmallDetr(cfg)
    backbone.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    drop = int(cfg.max_steps * 2 / 3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 if step < drop else 0.1)
    rng = np.random.default_rng(cfg.seed)
    trainer = Trainer(model, optimizer, total_steps=cfg.max_steps, options=options, folder=checkpoints,
                      desc="small detr", schedulers={"lr": schedule}, generators={"picks": rng})  # fmt: skip
    if not options.resume:
        trainer.state["losses"] = []
    losses: list[float] = trainer.state["losses"]
    backbone.to(trainer.device)
    images = [s.image for s in samples]
    views: list[list[torch.Tensor]] = []
    targets: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    if trainer.step < cfg.max_steps:  # a finished run that was restored has nothing to cache
        views.append(lite0_pyramids(images, backbone))
        targets.append([(torch.as_tensor(s.boxes, dtype=torch.float32), torch.as_tensor(s.labels)) for s in samples])
    if cfg.flip and views:
        views.append(lite0_pyramids(images, backbone, flip=True))
        targets.append([(torch.as_tensor(flipped_boxes(s.boxes, size)), torch.as_tensor(s.labels)) for s in samples])
    cache_s = time.perf_counter() - start
    model.train()
    for _ in trainer.steps():
        if cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds:
            break
        view = int(rng.integers(len(views)))
        picks = rng.choice(len(samples), size=min(cfg.batch_size, len(samples)), replace=False)
        index = torch.as_tensor(picks, device=trainer.device)
        with trainer.autocast():
            out = model(views[view][0][index], views[view][1][index])
        batch_targets = [tuple(t.to(trainer.device) for t in targets[view][i]) for i in picks.tolist()]
        loss = detr_losses(out["logits"].float(), out["boxes"].float(), batch_targets, size)
        proposals = detr_losses(out["proposal_logits"][None].float(), out["proposal_boxes"][None].float(),
                                batch_targets, size)  # fmt: skip
        loss = {k: loss[k] + proposals[k] for k in loss}
        losses.append(float(loss["total"].detach()))
        trainer.update(loss["total"])
    trainer.finish()
    history = {"steps": trainer.step, "losses": losses, "train_s": time.perf_counter() - start, "cache_s": cache_s,
               "finished": trainer.step >= cfg.max_steps,
               "trainable_params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    return model.eval(), history


# ----------------------------------------------------------------------------------------------- contract
class LiteDetr(nn.Module):
    """Frozen Lite0 backbone + ``SmallDetr``: images in, the DETR's outputs and the backbone's stride-4 map out."""

    def __init__(self, backbone: nn.Module, detr: SmallDetr):
        super().__init__()
        self.backbone, self.detr = backbone, detr

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pyramid = self.backbone.forward_pyramid(x)  # strides 4, 8, 16, 32
        return {**self.detr(pyramid[1], pyramid[2]), "stride4": pyramid[0]}


class LiteDetrFrozen(DetrFrozen):
    """``FrozenDetector`` over ``LiteDetr``: stride-4 Lite0 map, stride-16 encoder memory, last-layer query states."""

    def __init__(self, model: LiteDetr):
        self.module = model
        self.mean, self.std = MEAN, STD
        self.num_classes = model.detr.cfg.num_classes
        self.feature_channels = (model.backbone.fine_channels, model.detr.cfg.dim)
        self.embed_dims = (model.detr.cfg.dim,)

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> DetectorOutputs:
        """Run backbone and DETR once on normalised ``x`` (B, 3, H, W)."""
        from torchvision.ops import box_convert

        if self.module.training:
            raise PotpourriError("the frozen detector must be in eval mode (call .eval())")
        out = self.module(x)
        height, width = x.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32, device=x.device)
        boxes = box_convert(out["boxes"][-1].float(), "cxcywh", "xyxy") * scale
        strides = (height / out["stride4"].shape[-2], height / out["memory"].shape[-2])
        return DetectorOutputs([out["stride4"], out["memory"]], strides, boxes, out["logits"][-1].float().sigmoid(),
                               [out["hidden"]], (height, width))  # fmt: skip


@torch.no_grad()
def predict_boxes(frozen: DetrFrozen, images: Sequence[np.ndarray], *, batch_size: int = 16) -> list[dict[str, Any]]:
    """Per image every query's box, best class score and label (the input of ``detect.train.coco_map``)."""
    from potpourri.data.transforms import images_to_tensor

    device = next(frozen.module.parameters()).device
    results = []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start : start + batch_size], frozen.mean, frozen.std).contiguous().to(device)
        out = frozen.outputs(x)
        for row in range(len(x)):
            kept = frozen.detections(out, row, conf=0.0, iou=1.0, max_det=out.boxes.shape[1])
            scores, labels = out.probs[row].max(-1)
            results.append({"boxes": out.boxes[row, kept].cpu().numpy(), "scores": scores[kept].cpu().numpy(),
                            "labels": labels[kept].cpu().numpy()})  # fmt: skip
    return results


# ----------------------------------------------------------------------------------------------- saving
def save_lite_detr(folder: str | os.PathLike, detr: SmallDetr, meta: dict[str, Any]) -> Path:
    """Write ``detr.safetensors`` (the DETR only: the backbone is the ImageNet Lite0) and ``detr.json`` atomically."""
    from potpourri.core.io import save_bundle

    folder = Path(folder)
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(detr.cfg).items()}
    save_bundle(folder / "detr.safetensors", detr.state_dict(), folder / "detr.json", {**meta, "config": config})
    return folder / "detr.safetensors"


def load_lite_detr(folder: str | os.PathLike, backbone: nn.Module | None = None) -> tuple[LiteDetr, dict[str, Any]]:
    """The ``LiteDetr`` saved by ``save_lite_detr`` (eval mode; the ImageNet Lite0 unless ``backbone``) and its
    metadata."""
    from potpourri.core.io import load_bundle
    from potpourri.models.yolo import Lite0Backbone

    folder = Path(folder)
    meta, state = load_bundle(folder / "detr.safetensors", folder / "detr.json",
                              missing=f"'{folder}' holds no detr.json", fix="re-run the DETR training")  # fmt: skip
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
    detr = SmallDetr(SmallDetrConfig(**config))
    detr.load_state_dict(state)
    return LiteDetr(backbone or Lite0Backbone(pretrained=True), detr).eval(), meta
