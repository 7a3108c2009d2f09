"""A small SAM (Kirillov et al.): prompt encoder, two-way transformer mask decoder and a Lite0 image encoder, in the
official ``segment_anything`` layout so that official checkpoints load (``build_official_sam``). Training is in
``segment/sam``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from potpourri.core.errors import PotpourriError
from potpourri.core.io import load_bundle, save_bundle

CONFIG_FILE, TENSORS_FILE = "sam.json", "sam.safetensors"
FORMAT = "potpourri-sam-v1"


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
    def backbone_features(self, images: np.ndarray, *, batch: int = 16) -> torch.Tensor:
        """(N, S, S, 3) uint8 at ``image_size`` → frozen backbone features (N, C, S/16, S/16) on the SAM's device,
        in batches of ``batch`` with the backbone's BatchNorm in eval mode."""
        device = self.pixel_mean.device
        backbone = self.image_encoder.backbone
        was = backbone.training
        backbone.eval()
        out = []
        for first in range(0, len(images), batch):
            x = torch.from_numpy(np.array(images[first : first + batch], np.float32)).to(device).permute(0, 3, 1, 2)
            out.append(backbone((x / 255.0 - self.pixel_mean) / self.pixel_std))  # np.array: a writable copy
        backbone.train(was)
        return torch.cat(out)

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
            from potpourri.core.registry import create_model

            backbone = create_model(config.backbone, pretrained=False)
        sam = cls(config, backbone=backbone)
        sam.load_state_dict(state)
        return sam.eval()


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
