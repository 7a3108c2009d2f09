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

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from potpourri.errors import PotpourriError
from potpourri.weights import load_bundle, save_bundle

__all__ = [
    "MaskDecoder",
    "PositionEmbeddingRandom",
    "PromptEncoder",
    "Sam",
    "SamConfig",
    "TwoWayTransformer",
    "build_official_sam",
    "evaluate_sam",
    "load_official_checkpoint",
    "sam_loss",
    "to_official_state_dict",
    "train_sam",
]

FORMAT = "potpourri-sam-v1"
CONFIG_FILE, TENSORS_FILE = "sam.json", "sam.safetensors"
_OFFICIAL_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


# ----------------------------------------------------------------------------------------------- blocks
class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (SAM's ``LayerNorm2d``)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return self.weight[:, None, None] * (x - mean) / torch.sqrt(var + self.eps) + self.bias[:, None, None]


class MLP(nn.Module):
    """``depth`` linear layers with ReLU between them (SAM's hypernetwork and IoU-head MLP)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, depth: int) -> None:
        super().__init__()
        dims = [dim_in] + [hidden] * (depth - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, [*dims[1:], dim_out], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else F.relu(layer(x))
        return x


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding: [sin, cos](2π (2p - 1) G) for p in [0, 1]², G ~ N(0, scale²)."""

    def __init__(self, num_pos_feats: int, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix  # (..., C/2)
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)  # (..., C)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Dense encoding of an (h, w) grid of cell centres: (C, h, w)."""
        h, w = size
        grid = torch.ones(h, w, device=self.positional_encoding_gaussian_matrix.device)
        y = (grid.cumsum(0) - 0.5) / h
        x = (grid.cumsum(1) - 0.5) / w
        return self._pe_encoding(torch.stack([x, y], dim=-1)).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Encode pixel coordinates (..., 2) as (x, y) of an image of ``image_size`` (H, W)."""
        coords = coords.clone().float()
        coords[..., 0] = coords[..., 0] / image_size[1]
        coords[..., 1] = coords[..., 1] / image_size[0]
        return self._pe_encoding(coords)


class PromptEncoder(nn.Module):
    """Points and boxes → sparse tokens; no mask → a learned dense embedding (SAM's ``PromptEncoder``)."""

    def __init__(
        self, embed_dim: int, image_embedding_size: tuple[int, int], input_image_size: tuple[int, int], mask_in_chans=16
    ) -> None:
        super().__init__()
        self.embed_dim, self.image_embedding_size, self.input_image_size = (
            embed_dim,
            image_embedding_size,
            input_image_size,
        )
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: negative point, 1: positive point, 2: top-left box corner, 3: bottom-right box corner
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        # kept for the official key layout; mask prompts are not used here
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)  # (1, C, h, w)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # pixel centres
        if pad:  # without a box, a "not a point" token stands in its place
            points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
            labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)  # (B, N, C)
        embedding = torch.where((labels == -1)[..., None], torch.zeros_like(embedding), embedding)
        embedding = embedding + (labels == -1)[..., None] * self.not_a_point_embed.weight
        embedding = embedding + (labels == 0)[..., None] * self.point_embeddings[0].weight
        embedding = embedding + (labels == 1)[..., None] * self.point_embeddings[1].weight
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)  # (B, 2, 2): (x0, y0), (x1, y1)
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)  # (B, 2, C)
        embedding[:, 0, :] += self.point_embeddings[2].weight[0]
        embedding[:, 1, :] += self.point_embeddings[3].weight[0]
        return embedding

    def forward(
        self, points: torch.Tensor | None, labels: torch.Tensor | None, boxes: torch.Tensor | None, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B, N, C) and dense (B, C, h, w) embeddings; ``points`` (B, N, 2) pixel (x, y), ``boxes`` (B, 4)."""
        sparse = [torch.empty(batch, 0, self.embed_dim, device=self.no_mask_embed.weight.device)]
        if points is not None:
            sparse.append(self._embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
        h, w = self.image_embedding_size
        dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return torch.cat(sparse, dim=1), dense


class Attention(nn.Module):
    """Multi-head attention with an optional down-projection of the internal width (SAM's ``Attention``)."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.internal_dim, self.num_heads = dim // downsample_rate, num_heads
        if self.internal_dim % num_heads:
            raise PotpourriError(f"width {self.internal_dim} is not divisible by {num_heads} heads")
        self.q_proj, self.k_proj = nn.Linear(dim, self.internal_dim), nn.Linear(dim, self.internal_dim)
        self.v_proj, self.out_proj = nn.Linear(dim, self.internal_dim), nn.Linear(self.internal_dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # (B, heads, N, C/heads)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, heads, Nq, Nk)
        out = (attn @ v).transpose(1, 2).flatten(2)  # (B, Nq, internal)
        return self.out_proj(out)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token→image cross-attention, MLP on tokens, image→token cross-attention."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, downsample_rate: int, skip_first_layer_pe: bool):
        super().__init__()
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = Attention(dim, num_heads, downsample_rate)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(self, queries, keys, query_pe, key_pe) -> tuple[torch.Tensor, torch.Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)  # (B, N, C)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        q, k = queries + query_pe, keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q, k = queries + query_pe, keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))  # (B, HW, C)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer: ``depth`` blocks, then a final token→image attention."""

    def __init__(self, depth: int, embedding_dim: int, num_heads: int, mlp_dim: int, downsample_rate: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(embedding_dim, num_heads, mlp_dim, downsample_rate, skip_first_layer_pe=i == 0)
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        keys = image.flatten(2).permute(0, 2, 1)  # (B, HW, C)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = tokens  # (B, N, C)
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys


class MaskDecoder(nn.Module):
    """IoU token + mask tokens through the two-way transformer; hypernetwork MLPs weight the upscaled image map."""

    def __init__(self, dim: int, transformer: TwoWayTransformer, *, num_multimask_outputs: int = 3, iou_hidden=256):
        super().__init__()
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(self.num_mask_tokens))
        self.iou_prediction_head = MLP(dim, iou_hidden, self.num_mask_tokens, 3)

    def forward(self, image_embeddings, image_pe, sparse, dense, multimask_output: bool):
        """Masks (B, 3 or 1, 4h, 4w) as logits and predicted IoUs (B, 3 or 1)."""
        b = image_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse], dim=1)  # (B, 1+4+N, C)
        src = image_embeddings + dense  # (B, C, h, w)
        pos = image_pe.expand(b, -1, -1, -1)
        hs, src = self.transformer(src, pos, tokens)
        iou_token_out, mask_tokens_out = hs[:, 0], hs[:, 1 : 1 + self.num_mask_tokens]
        _, c, h, w = image_embeddings.shape
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )  # (B, 4, C/8)
        masks = (hyper_in @ upscaled.flatten(2)).reshape(b, -1, *upscaled.shape[-2:])  # (B, 4, 4h, 4w)
        iou_pred = self.iou_prediction_head(iou_token_out)  # (B, 4)
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]


class LiteImageEncoder(nn.Module):
    """EfficientNet-Lite0 stem and stages 0–4 (stride 16, 112 channels), then a SAM-style neck to ``dim``."""

    def __init__(self, backbone: nn.Module | None, dim: int, *, stage: int = 4) -> None:
        super().__init__()
        if backbone is None:  # tiny random stand-in for tests: stride 16, a few channels
            self.backbone = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.GELU(), nn.Conv2d(8, 16, 4, 4))
        else:
            if not all(hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks")):
                raise PotpourriError(f"SAM needs an EfficientNet-style backbone, got {type(backbone).__name__}")
            self.backbone = nn.Sequential(backbone.conv_stem, backbone.bn1, *backbone.blocks[: stage + 1])
        with torch.no_grad():
            channels = self.backbone(torch.zeros(1, 3, 64, 64)).shape[1]
        self.neck = nn.Sequential(
            nn.Conv2d(channels, dim, 1, bias=False),
            LayerNorm2d(dim),
            nn.Conv2d(dim, dim, 3, padding=1, bias=False),
            LayerNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))  # (B, dim, H/16, W/16)


# ----------------------------------------------------------------------------------------------- model
@dataclass
class SamConfig:
    """Everything that defines the small SAM and its training (saved in ``sam.json``)."""

    backbone: str = "efficientnet_lite0"
    image_size: int = 256
    prompt_dim: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 256
    iou_hidden: int = 64
    train_neck: bool = True  # the Lite0 backbone is always frozen; the projection to prompt_dim may train
    steps: int = 1200
    batch_size: int = 8
    lr: float = 1e-3
    focal_weight: float = 20.0  # SAM's 20:1 focal:dice
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Sam(nn.Module):
    """A compact SAM: frozen Lite0 image encoder, prompt encoder, two-way mask decoder."""

    def __init__(self, config: SamConfig, *, backbone: nn.Module | None) -> None:
        super().__init__()
        self.config = config
        if config.image_size % 16:
            raise PotpourriError(f"image_size {config.image_size} must be a multiple of 16")
        side = config.image_size // 16
        self.image_encoder = LiteImageEncoder(backbone, config.prompt_dim)
        self.prompt_encoder = PromptEncoder(config.prompt_dim, (side, side), (config.image_size, config.image_size))
        transformer = TwoWayTransformer(config.depth, config.prompt_dim, config.num_heads, config.mlp_dim)
        self.mask_decoder = MaskDecoder(config.prompt_dim, transformer, iou_hidden=config.iou_hidden)
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        self.register_buffer("pixel_mean", torch.tensor(cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1))
        self.freeze()

    def freeze(self) -> None:
        """Freeze the backbone (and the neck unless ``train_neck``); BatchNorm statistics stay fixed via eval()."""
        for p in self.image_encoder.backbone.parameters():
            p.requires_grad_(False)
        for p in self.image_encoder.neck.parameters():
            p.requires_grad_(self.config.train_neck)

    def train(self, mode: bool = True) -> Sam:
        super().train(mode)
        self.image_encoder.backbone.eval()  # frozen BatchNorm: running statistics must not move
        return self

    @torch.no_grad()
    def backbone_features(self, images: np.ndarray) -> torch.Tensor:
        """(N, S, S, 3) uint8 at ``image_size`` → frozen backbone features (N, C, S/16, S/16)."""
        x = torch.from_numpy(np.array(images, np.float32)).permute(0, 3, 1, 2) / 255.0  # np.array: a writable copy
        was = self.image_encoder.backbone.training
        self.image_encoder.backbone.eval()
        out = self.image_encoder.backbone((x - self.pixel_mean) / self.pixel_std)
        self.image_encoder.backbone.train(was)
        return out

    def decode(self, features, points=None, labels=None, boxes=None, *, multimask_output: bool = True):
        """Backbone features → (mask logits (B, M, S/4, S/4), IoU predictions (B, M))."""
        embeddings = self.image_encoder.neck(features)  # (B, C, h, w)
        sparse, dense = self.prompt_encoder(points, labels, boxes, embeddings.shape[0])
        return self.mask_decoder(embeddings, self.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output)

    def forward(self, images: torch.Tensor, points=None, labels=None, boxes=None, *, multimask_output: bool = True):
        """Normalised images (B, 3, S, S) and prompts in pixels → (mask logits, IoU predictions)."""
        return self.decode(
            self.image_encoder.backbone(images), points, labels, boxes, multimask_output=multimask_output
        )

    # -- persistence ------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        meta = {"format": FORMAT, "config": asdict(self.config)}
        save_bundle(
            folder / TENSORS_FILE, self.state_dict(), folder / CONFIG_FILE, meta, tensor_metadata={"format": FORMAT}
        )
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Sam:
        """Load a run saved by ``save``; the Lite0 architecture is rebuilt without downloading weights."""
        folder = Path(folder)
        meta, state = load_bundle(
            folder / TENSORS_FILE,
            folder / CONFIG_FILE,
            missing=f"{folder}: no {CONFIG_FILE}; pass a run folder written by `potpourri sam-train`",
            fix="retrain with `potpourri sam-train`",
            format=FORMAT,
        )
        config = SamConfig(**meta["config"])
        backbone = None
        if config.backbone != "none":
            from potpourri.registry import create_model

            backbone = create_model(config.backbone, pretrained=False)
        sam = cls(config, backbone=backbone)
        sam.load_state_dict(state)
        return sam.eval()


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


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss per mask, averaged over pixels: (B, M)."""
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    weight = alpha * target + (1 - alpha) * (1 - target)
    return (weight * ce * (1 - p_t) ** gamma).flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per mask: (B, M)."""
    prob = torch.sigmoid(logits).flatten(2)
    target = target.flatten(2)
    return 1 - (2 * (prob * target).sum(-1) + eps) / (prob.sum(-1) + target.sum(-1) + eps)


def sam_loss(
    logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, *, focal_weight: float = 20.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """SAM's loss: focal·w + dice on the best of the M masks only, plus MSE of predicted IoU against actual IoU.

    ``logits`` (B, M, S, S) at the target's resolution, ``target`` (B, 1, S, S) in {0, 1}.
    """
    target = target.expand_as(logits)
    mask_loss = focal_weight * focal_loss(logits, target) + dice_loss(logits, target)  # (B, M)
    best = mask_loss.argmin(dim=1)  # SAM backpropagates only the lowest-loss mask of an ambiguous prompt
    rows = torch.arange(len(best))
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
    categories=("brick", "grass", "gravel"),
):  # fmt: skip
    """DS-Synth defect images → images (N, S, S, 3) and (image index, region) pairs; ``multi_share`` of the images
    hold 2–3 defects, so that the prompt, not the image alone, says which region is meant."""
    from potpourri.data.synth import DEFECTS, MULTI, make_samples

    n_multi = round(per_category * multi_share)
    images, items = [], []
    for category in categories:
        samples = make_samples(category, split, per_category - n_multi, seed=seed, size=size, kinds=DEFECTS)
        samples += make_samples(category, split, n_multi, seed=seed, size=size, kinds=(MULTI,))
        for sample in samples:
            for region in regions(sample.mask):
                items.append((len(images), region))
            images.append(sample.image)
    return np.stack(images), items


# ----------------------------------------------------------------------------------------------- train / evaluate
def _batch_prompts(prompts: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    if "boxes" in prompts[0]:
        return {"boxes": torch.from_numpy(np.stack([p["boxes"] for p in prompts]))}
    return {
        "points": torch.from_numpy(np.stack([p["points"] for p in prompts])),
        "labels": torch.from_numpy(np.stack([p["labels"] for p in prompts])),
    }


def _upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


def train_sam(
    sam: Sam, images: np.ndarray, items: list[tuple[int, np.ndarray]], *, progress: bool = True, log=None
) -> list[float]:
    """Train prompt encoder and mask decoder (and the neck if ``train_neck``) on regions with sampled prompts."""
    from tqdm import tqdm

    cfg = sam.config
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    features = torch.cat([sam.backbone_features(images[i : i + 16]) for i in range(0, len(images), 16)])
    params = [p for p in sam.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, cfg.steps // 20)  # linear warm-up, then cosine decay
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))
    )
    sam.train()
    losses = []
    for step in tqdm(range(cfg.steps), disable=not progress, desc="sam-train"):
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
        target = torch.from_numpy(np.stack([items[j][1] for j in chosen])).float()[:, None]  # (B, 1, S, S)
        logits, iou_pred = sam.decode(features[[items[j][0] for j in chosen]], **_batch_prompts(prompts),
                                      multimask_output=kind == "point")  # fmt: skip
        loss, parts = sam_loss(_upsample(logits, cfg.image_size), iou_pred, target, focal_weight=cfg.focal_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log is not None and (step % 100 == 0 or step == cfg.steps - 1):
            log({"step": step, "loss": loss.item(), **parts})
    sam.eval()
    return losses


@torch.no_grad()
def predict_mask(sam: Sam, features: torch.Tensor, prompt: dict[str, np.ndarray]) -> np.ndarray:
    """One (S, S) bool mask for one image's features (1, C, h, w); a single click takes the best-predicted of 3."""
    single_click = "points" in prompt and len(prompt["points"]) == 1
    logits, iou_pred = sam.decode(features, **_batch_prompts([prompt]), multimask_output=single_click)
    best = int(iou_pred[0].argmax())
    return (_upsample(logits[:, best : best + 1], sam.config.image_size)[0, 0] > 0).numpy()


def _iou(pred: np.ndarray, target: np.ndarray) -> float:
    return float((pred & target).sum() / max(1, (pred | target).sum()))


@torch.no_grad()
def evaluate_sam(sam: Sam, images: np.ndarray, items: list[tuple[int, np.ndarray]], *, progress: bool = True):
    """mIoU over regions for 1 centre click, 3 clicks (2 corrective), the tight box; and the box-fill baseline."""
    from tqdm import tqdm

    sam.eval()
    features = torch.cat([sam.backbone_features(images[i : i + 16]) for i in range(0, len(images), 16)])
    scores: dict[str, list[float]] = {"1 click": [], "3 clicks": [], "box": [], "box filled (baseline)": []}
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


def run_sam_experiment(*, out: str | os.PathLike | None = None, per_category: int = 100, test_per_category: int = 20,
                       config: SamConfig | None = None, progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Train on DS-Synth training rows, evaluate on held-out rows, save the run and return its summary."""
    from potpourri.registry import create_model
    from potpourri.runs import new_run

    config = config or SamConfig()
    torch.manual_seed(config.seed)
    run = new_run(
        "sam",
        out,
        config={**asdict(config), "per_category": per_category, "test_per_category": test_per_category},
        seed=config.seed,
    )
    start = time.perf_counter()
    sam = Sam(config, backbone=create_model(config.backbone, pretrained=True))
    train_images, train_items = synth_regions("train", per_category, size=config.image_size, seed=config.seed)
    test_images, test_items = synth_regions("test", test_per_category, size=config.image_size, seed=config.seed)
    frozen = {k: v.clone() for k, v in sam.image_encoder.backbone.state_dict().items()}
    losses = train_sam(sam, train_images, train_items, progress=progress, log=run.log_metrics)
    train_s = time.perf_counter() - start
    same = all(torch.equal(frozen[k], v) for k, v in sam.image_encoder.backbone.state_dict().items())
    metrics = evaluate_sam(sam, test_images, test_items, progress=progress)
    sam.save(run.path)
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


# ----------------------------------------------------------------------------------------------- official weights
def to_official_state_dict(sam: Sam) -> dict[str, torch.Tensor]:
    """Our prompt encoder and mask decoder in ``segment_anything``'s key layout (the names are already the same)."""
    return {k: v for k, v in sam.state_dict().items() if k.startswith(("prompt_encoder.", "mask_decoder."))}


def load_official_checkpoint(path: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """Read ``sam_vit_b.pth`` / ``mobile_sam.pt`` into its three parts: {"image_encoder": {key: tensor}, ...}."""
    path = Path(path)
    if not path.is_file():
        raise PotpourriError(
            f"{path}: SAM checkpoint not found; download sam_vit_b_01ec64.pth from "
            "https://github.com/facebookresearch/segment-anything#model-checkpoints (or mobile_sam.pt from "
            "https://github.com/ChaoningZhang/MobileSAM) and pass its local path"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle or zip errors of a corrupt file
        raise PotpourriError(f"{path}: cannot read a SAM state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in _OFFICIAL_PARTS}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in parts:
            parts[head][rest] = value
    missing = [name for name, part in parts.items() if not part]
    if missing:
        raise PotpourriError(f"{path}: no {', '.join(missing)}.* keys; this is not a segment_anything checkpoint")
    return parts


def official_variant(parts: dict[str, dict[str, torch.Tensor]]) -> str:
    """ "vit_t" (MobileSAM's TinyViT), or "vit_b" / "vit_l" / "vit_h" by the ViT depth."""
    encoder = parts["image_encoder"]
    if any(k.startswith("layers.") for k in encoder):
        return "vit_t"
    depth = 1 + max(int(k.split(".")[1]) for k in encoder if k.startswith("blocks."))
    return {12: "vit_b", 24: "vit_l", 32: "vit_h"}.get(depth, f"vit depth {depth}")


def build_official_sam(path: str | os.PathLike) -> nn.Module:
    """The official SAM / MobileSAM model with the checkpoint's weights (needs segment_anything or mobile_sam)."""
    parts = load_official_checkpoint(path)
    variant = official_variant(parts)
    # mobile_sam ships SAM's ViT builders too, so either package builds vit_b/l/h
    candidates = ("mobile_sam",) if variant == "vit_t" else ("segment_anything", "mobile_sam")
    registry = None
    for module_name in candidates:
        try:
            registry = __import__(module_name, fromlist=["sam_model_registry"]).sam_model_registry
            break
        except ImportError:
            continue
    if registry is None:
        package = "mobilesam-mirror (imports as mobile_sam)" if variant == "vit_t" else "segment-anything"
        raise PotpourriError(f"{path} is a {variant} checkpoint; `pip install {package}` to use it") from None
    model = registry[variant](checkpoint=None)
    state = {f"{name}.{k}": v for name, part in parts.items() for k, v in part.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PotpourriError(f"{path}: key mismatch with {module_name} {variant} ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected, e.g. {(missing or unexpected)[:2]})")  # fmt: skip
    return model.eval()


def load_official_into(sam: Sam, parts: dict[str, dict[str, torch.Tensor]]) -> None:
    """Load an official checkpoint's prompt encoder and mask decoder into ours (widths must match, e.g. 256)."""
    for name in ("prompt_encoder", "mask_decoder"):
        module = getattr(sam, name)
        try:
            module.load_state_dict(parts[name], strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[1:2] or [str(exc)]
            raise PotpourriError(f"{name}: the checkpoint does not fit this model ({first[0].strip()})") from None
