"""An official SAM / MobileSAM checkpoint behind our small SAM's interface, at any input size S (a multiple of 16).

``OfficialSam`` has what code written for ``models.sam.Sam`` reads: ``config.image_size`` / ``config.prompt_dim``,
``pixel_mean`` / ``pixel_std`` (on the 0..1 scale), ``image_encoder.backbone`` (the official trunk: TinyViT or the
ViT without its neck, (B, C, S/16, S/16)) and ``image_encoder.neck`` (the official neck, SAM's layout),
``backbone_features``, ``prompt_encoder(points, labels, boxes, n)`` (our call, the official module) and the official
``mask_decoder``. So SAM-CLIP's teacher A, its metrics and its "copy of teacher A's encoder" student run unchanged.

Departure from the official pipeline: the image is S px, not resized to 1024. For S != 1024 the ViT's absolute
positional embedding is resampled bicubically to S/16 (its relative-position tables are resampled by SAM's own code)
and MobileSAM's TinyViT is rebuilt for S (its layers fix their resolution; the weights do not depend on it). At
S = 1024 every forward is the official one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from potpourri.core.errors import PotpourriError
from potpourri.models.sam import build_official_sam

__all__ = ["OfficialSam", "OfficialSamConfig", "OfficialTrunk", "load_official_sam"]

NATIVE_SIZE = 1024  # the official models' input side
# MobileSAM's TinyViT (mobile_sam.build_sam.build_sam_vit_t): rebuilt with another img_size, the weights fit unchanged
TINY_VIT = {
    "embed_dims": [64, 128, 160, 320], "depths": [2, 2, 6, 2], "num_heads": [2, 4, 5, 10],
    "window_sizes": [7, 7, 14, 7], "mlp_ratio": 4.0, "drop_rate": 0.0, "drop_path_rate": 0.0, "use_checkpoint": False,
    "mbconv_expand_ratio": 4.0, "local_conv_size": 3, "layer_lr_decay": 0.8,
}  # fmt: skip


class OfficialTrunk(nn.Module):
    """The official image encoder without its neck: (B, 3, S, S) normalised → (B, C, S/16, S/16)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.tiny_vit = hasattr(encoder, "layers")  # MobileSAM's TinyViT; else SAM's ImageEncoderViT
        self.patch_embed = encoder.patch_embed
        if self.tiny_vit:
            self.layers = encoder.layers
            self.out_channels = int(encoder.neck[0].in_channels)
        else:
            self.pos_embed = encoder.pos_embed  # (1, 64, 64, C) or None
            self.blocks = encoder.blocks
            self.out_channels = int(encoder.neck[0].in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // 16, x.shape[-1] // 16
        if self.tiny_vit:
            tokens = self.patch_embed(x)  # (B, C0, S/4, S/4)
            for layer in self.layers:
                tokens = layer(tokens)  # ... (B, h*w, C) after the first stage
            return tokens.view(len(x), h, w, -1).permute(0, 3, 1, 2)  # (B, C, h, w)
        tokens = self.patch_embed(x)  # (B, h, w, C)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[1:3] != tokens.shape[1:3]:  # bicubic resampling of the 64×64 grid to h×w
                pos = F.interpolate(pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
                pos = pos.permute(0, 2, 3, 1)
            tokens = tokens + pos
        for block in self.blocks:
            tokens = block(tokens)  # (B, h, w, C); global blocks resample their rel-pos tables themselves
        return tokens.permute(0, 3, 1, 2)  # (B, C, h, w)


class OfficialImageEncoder(nn.Module):
    """``backbone`` (``OfficialTrunk``) then the official ``neck``: (B, 3, S, S) → (B, 256, S/16, S/16)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.backbone = OfficialTrunk(encoder)
        self.neck = encoder.neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))


class OfficialPromptEncoder(nn.Module):
    """The official prompt encoder with our call: ``(points, labels, boxes, n) -> (sparse, dense)``."""

    def __init__(self, prompt_encoder: nn.Module, image_size: int) -> None:
        super().__init__()
        self.official = prompt_encoder
        prompt_encoder.image_embedding_size = (image_size // 16, image_size // 16)  # read by get_dense_pe / no-mask
        prompt_encoder.input_image_size = (image_size, image_size)  # prompts are normalised by it

    def get_dense_pe(self) -> torch.Tensor:
        return self.official.get_dense_pe()  # (1, C, S/16, S/16)

    def forward(self, points, labels, boxes, n: int):
        return self.official(points=None if points is None else (points, labels), boxes=boxes, masks=None)


@dataclass
class OfficialSamConfig:
    """What code written for our ``SamConfig`` reads, for an official model run at ``image_size``."""

    image_size: int
    prompt_dim: int
    variant: str  # vit_t, vit_b, vit_l or vit_h


class OfficialSam(nn.Module):
    """An official SAM / MobileSAM (frozen, eval) with our small SAM's interface at ``image_size`` px."""

    def __init__(self, model: nn.Module, image_size: int, variant: str) -> None:
        super().__init__()
        if image_size % 16:
            raise PotpourriError(f"image_size {image_size} must be a multiple of 16")
        self.config = OfficialSamConfig(image_size, int(model.prompt_encoder.embed_dim), variant)
        self.image_encoder = OfficialImageEncoder(model.image_encoder)
        self.prompt_encoder = OfficialPromptEncoder(model.prompt_encoder, image_size)
        self.mask_decoder = model.mask_decoder
        self.register_buffer("pixel_mean", model.pixel_mean.detach().view(1, 3, 1, 1) / 255.0)
        self.register_buffer("pixel_std", model.pixel_std.detach().view(1, 3, 1, 1) / 255.0)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def backbone_features(self, images: np.ndarray, *, batch: int = 16) -> torch.Tensor:
        """(N, S, S, 3) uint8 → the trunk's features (N, C, S/16, S/16) on the model's device (as ``Sam``'s)."""
        device, backbone = self.pixel_mean.device, self.image_encoder.backbone
        out = []
        for first in range(0, len(images), batch):
            x = torch.from_numpy(np.array(images[first : first + batch], np.float32)).to(device).permute(0, 3, 1, 2)
            out.append(backbone((x / 255.0 - self.pixel_mean) / self.pixel_std))
        return torch.cat(out)


def load_official_sam(path: str | os.PathLike, *, image_size: int = NATIVE_SIZE) -> OfficialSam:
    """``sam_vit_b.pth`` / ``mobile_sam.pt`` (``models.sam.build_official_sam``: weights_only, strict) run at
    ``image_size`` px behind our interface. Example: ``load_official_sam("mobile_sam.pt", image_size=96)``."""
    model = build_official_sam(path)
    encoder = model.image_encoder
    variant = "vit_t" if hasattr(encoder, "layers") else {12: "vit_b", 24: "vit_l", 32: "vit_h"}[len(encoder.blocks)]
    if variant == "vit_t" and image_size != NATIVE_SIZE:
        from mobile_sam.modeling import TinyViT

        encoder = TinyViT(img_size=image_size, in_chans=3, num_classes=1000, **TINY_VIT)
        encoder.load_state_dict(model.image_encoder.state_dict(), strict=True)
        model.image_encoder = encoder
    return OfficialSam(model.eval(), image_size, variant)
