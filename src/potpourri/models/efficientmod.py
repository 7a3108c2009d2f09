"""EfficientMod (Ma et al., "Efficient Modulation for Vision Networks", ICLR 2024), our implementation.

The modulation block replaces query-key attention with ``out = fc2(v ⊙ ctx)``: a value branch ``v = fc1(x)``
(``C → rC``, GELU when ``r > 1``) multiplied by a context branch ``ctx = g(GELU(DWConv7x7(f(x))))`` (``C → C``,
tiled ``r`` times: broadcast over an ``(r, C)`` view of the value, no copy), with one pre-norm residual and layer
scale per block. Blocks alternate ``r = 1`` (pure modulation) and ``r = 6`` (or 4: modulation fused with an MLP).
Stages 3–4 end with a few plain attention blocks. Tensors are channels-last ``(B, H, W, C)`` inside the stages,
as in the paper's code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from potpourri.core.registry import register_model
from potpourri.models._base import ClassifierMixin

__all__ = ["EfficientMod", "EfficientModCfg", "efficientmod_s", "efficientmod_xs", "efficientmod_xxs"]


class ContextModulation(nn.Module):
    """``fc2(act(fc1(x)) ⊙ tile(g(GELU(dwconv(f(x))))))`` on channels-last input."""

    def __init__(self, dim: int, ratio: int, *, kernel_size: int = 7):
        super().__init__()
        self.ratio = ratio
        self.value_proj = nn.Linear(dim, dim * ratio)  # fc1
        self.value_act = nn.GELU() if ratio > 1 else nn.Identity()  # no activation for pure modulation (r = 1)
        self.context_in = nn.Linear(dim, dim)  # f
        self.context_conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.context_act = nn.GELU()
        self.context_out = nn.Linear(dim, dim)  # g
        self.out_proj = nn.Linear(dim * ratio, dim)  # fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.context_in(x).permute(0, 3, 1, 2)  # (B, C, H, W)
        context = self.context_act(self.context_conv(context)).permute(0, 2, 3, 1)  # (B, H, W, C)
        context = self.context_out(context)  # (B, H, W, C)
        value = self.value_act(self.value_proj(x))  # (B, H, W, rC)
        if self.ratio > 1:  # channel j of the value uses context[j mod C]: broadcast, not a tiled copy of the context
            B, H, W, C = context.shape
            mixed = (value.view(B, H, W, self.ratio, C) * context.unsqueeze(3)).view(B, H, W, self.ratio * C)
            return self.out_proj(mixed)  # (B, H, W, C)
        return self.out_proj(value * context)  # (B, H, W, C)


class ModulationBlock(nn.Module):
    """``x + drop_path(γ · modulation(LayerNorm(x)))`` with layer scale γ initialised small."""

    def __init__(
        self, dim: int, ratio: int, *, kernel_size: int = 7, drop_path: float = 0.0, layer_scale: float = 1e-4
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.modulation = ContextModulation(dim, ratio, kernel_size=kernel_size)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.gamma * self.modulation(self.norm(x)))  # (B, H, W, C)


class GlobalAttention(nn.Module):
    """Multi-head self-attention over all positions; head width is at least 32 (as in the paper's code)."""

    def __init__(self, dim: int, *, num_heads: int = 8):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = max(dim // num_heads, 32)
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))  # (B, N, C)


class AttentionBlock(nn.Module):
    """Pre-norm attention + MLP, no layer scale, on channels-last maps."""

    def __init__(self, dim: int, *, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GlobalAttention(dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)  # (B, N, C)
        tokens = tokens + self.drop_path(self.attn(self.norm1(tokens)))
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        return tokens.reshape(B, H, W, C)


class ConvNormDown(nn.Module):
    """Strided conv + LayerNorm, channels-last in and out (stem and stage downsampling)."""

    def __init__(self, in_chs: int, out_chs: int, *, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H', W', C')
        return self.norm(x)


class EfficientModStage(nn.Module):
    """Optional downsampling, then modulation blocks, then attention blocks."""

    def __init__(
        self,
        in_chs: int,
        dim: int,
        ratios: list[int],
        *,
        attention_depth: int,
        att_ratio: float,
        drop_paths: list[float],
        downsample: bool,
    ):
        super().__init__()
        self.downsample = ConvNormDown(in_chs, dim, kernel_size=3, stride=2) if downsample else nn.Identity()
        blocks: list[nn.Module] = [
            ModulationBlock(dim, r, drop_path=dp) for r, dp in zip(ratios, drop_paths, strict=False)
        ]
        blocks += [AttentionBlock(dim, mlp_ratio=att_ratio, drop_path=dp) for dp in drop_paths[len(ratios) :]]
        assert len(blocks) == len(ratios) + attention_depth
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))  # (B, H, W, C)


@dataclass(frozen=True)
class EfficientModCfg:
    """One EfficientMod variant: widths, modulation depths, attention depths, the ``r`` pattern per stage."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    attention_depths: tuple[int, int, int, int]
    ratio_pattern: tuple[int, int]
    att_ratios: tuple[float, float, float, float] = (4, 4, 4, 4)
    drop_path_rate: float = 0.0


class EfficientMod(ClassifierMixin, nn.Module):
    """EfficientMod backbone + classifier with timm's contract (forward_features/forward_head/feature_info)."""

    def __init__(
        self,
        cfg: EfficientModCfg,
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = cfg.embed_dims[-1]
        self.stem = ConvNormDown(in_chans, cfg.embed_dims[0], kernel_size=7, stride=4)
        rate = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        total = sum(cfg.depths) + sum(cfg.attention_depths)
        schedule = torch.linspace(0, rate, total).tolist()  # stochastic depth grows with depth
        stages, in_chs, cursor = [], cfg.embed_dims[0], 0
        self.feature_info = []
        for i, (dim, depth, att_depth) in enumerate(zip(cfg.embed_dims, cfg.depths, cfg.attention_depths, strict=True)):
            ratios = [cfg.ratio_pattern[j % 2] for j in range(depth)]
            n = depth + att_depth
            stages.append(
                EfficientModStage(
                    in_chs,
                    dim,
                    ratios,
                    attention_depth=att_depth,
                    att_ratio=cfg.att_ratios[i],
                    drop_paths=schedule[cursor : cursor + n],
                    downsample=i > 0,
                )
            )
            self.feature_info.append({"num_chs": dim, "reduction": 4 * 2**i, "module": f"stages.{i}"})
            in_chs, cursor = dim, cursor + n
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Conv2d):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Channels-first feature maps after each stage, for dense tasks: strides 4, 8, 16, 32."""
        x = self.stem(x.permute(0, 2, 3, 1))  # (B, H/4, W/4, C0)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x.permute(0, 3, 1, 2))  # (B, Ci, H/s, W/s)
        return outputs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.permute(0, 2, 3, 1))  # (B, H/4, W/4, C0)
        x = self.norm(self.stages(x))  # (B, H/32, W/32, C)
        return x.permute(0, 3, 1, 2)  # (B, C, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean((2, 3)))  # (B, C)
        return x if pre_logits else self.head(x)


# Configurations of the paper (Table 1 / released code): params 4.7 M, 6.6 M, 12.9 M at 1000 classes.
CONFIGS = {
    "xxs": EfficientModCfg((32, 64, 128, 256), (2, 2, 6, 2), (0, 0, 1, 2), (1, 6)),
    "xs": EfficientModCfg((32, 64, 144, 288), (3, 3, 4, 2), (0, 0, 3, 3), (1, 4)),
    "s": EfficientModCfg(
        (32, 64, 144, 312), (4, 4, 8, 4), (0, 0, 4, 4), (1, 6), att_ratios=(4, 4, 4, 5), drop_path_rate=0.02
    ),
}


def _build(variant: str, pretrained: bool, **kwargs: Any) -> EfficientMod:
    # no pretrained_cfg is registered, so create_model refuses pretrained=True before we get here
    return EfficientMod(CONFIGS[variant], **kwargs)


@register_model(tags=("efficient", "hybrid"))
def efficientmod_xxs(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-xxs: 4.7 M params, 76.0 % ImageNet top-1 in the paper (no distillation)."""
    return _build("xxs", pretrained, **kwargs)


@register_model(tags=("efficient", "hybrid"))
def efficientmod_xs(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-xs: 6.6 M params, 78.3 % ImageNet top-1 in the paper (no distillation)."""
    return _build("xs", pretrained, **kwargs)


@register_model(tags=("efficient", "hybrid"))
def efficientmod_s(pretrained: bool = False, **kwargs: Any) -> EfficientMod:
    """EfficientMod-s: 12.9 M params, 81.0 % ImageNet top-1 in the paper (no distillation)."""
    return _build("s", pretrained, **kwargs)
