"""RepVGG / YOLOv6 RepConv blocks and a small RepConv classification net (``repconvnet_s``).

``RepConv`` trains as ``act(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x))`` and fuses, in eval semantics, into one
biased 3×3 conv. Each branch's BN is folded into its own conv first (``W·t``, ``β − μ·t``, ``t = γ/√(σ²+ε)``),
so the ordering trap of fusing one BN after the sum never arises. Model-level fusion: ``potpourri.models.reparam``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.registry import register_model
from potpourri.models._base import ClassifierMixin

__all__ = ["RepConv", "RepConvNet", "fold_bn", "repconvnet_s"]


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv into that conv's weight and bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    conv_bias = torch.zeros_like(bn.running_mean) if bias is None else bias
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias + (conv_bias - bn.running_mean) * scale


class RepConv(nn.Module):
    """RepVGG block: 3×3+BN, 1×1+BN and identity-BN branches (identity only when shapes allow), then act.

    Example:
        block = RepConv(32, 32); ...train...; block.eval().reparameterize()  # now one 3×3 conv
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        *,
        stride: int = 1,
        groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU,
        identity: bool = True,
    ):
        super().__init__()
        if in_chs % groups or out_chs % groups:
            raise ValueError(f"channels {in_chs}->{out_chs} must be divisible by groups={groups}")
        self.in_chs, self.out_chs, self.stride, self.groups = in_chs, out_chs, stride, groups
        self.conv3x3 = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(out_chs)
        )
        self.conv1x1 = nn.Sequential(
            nn.Conv2d(in_chs, out_chs, 1, stride, 0, groups=groups, bias=False), nn.BatchNorm2d(out_chs)
        )
        use_identity = identity and in_chs == out_chs and stride == 1
        self.identity = nn.BatchNorm2d(out_chs) if use_identity else None
        self.reparam_conv: nn.Conv2d | None = None
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.act(self.reparam_conv(x))  # (B, C_out, H/s, W/s)
        out = self.conv3x3(x) + self.conv1x1(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    def _identity_kernel(self) -> torch.Tensor:
        """The identity map as a grouped 3×3 kernel: a 1 at the centre tap of channel i within its group."""
        per_group = self.in_chs // self.groups
        kernel = torch.zeros(self.out_chs, per_group, 3, 3, device=self.conv3x3[0].weight.device)
        channels = torch.arange(self.out_chs)
        kernel[channels, channels % per_group, 1, 1] = 1.0
        return kernel

    @torch.no_grad()
    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single 3×3 kernel and bias equal to the three branches in eval mode."""
        weight, bias = fold_bn(self.conv3x3[0].weight, None, self.conv3x3[1])
        weight_1x1, bias_1x1 = fold_bn(self.conv1x1[0].weight, None, self.conv1x1[1])
        weight, bias = weight + F.pad(weight_1x1, [1, 1, 1, 1]), bias + bias_1x1  # 1×1 sits at the centre tap
        if self.identity is not None:
            weight_id, bias_id = fold_bn(self._identity_kernel(), None, self.identity)
            weight, bias = weight + weight_id, bias + bias_id
        return weight, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fuse the branches into ``reparam_conv`` and drop them; calling it again does nothing."""
        if self.reparam_conv is not None:
            return
        weight, bias = self.fused_kernel_bias()
        conv = nn.Conv2d(self.in_chs, self.out_chs, 3, self.stride, 1, groups=self.groups, bias=True)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        conv.to(weight.device)
        self.reparam_conv = conv
        del self.conv3x3, self.conv1x1, self.identity
        self.identity = None

    switch_to_deploy = reparameterize  # YOLOv6 / RepVGG spelling


class RepConvNet(ClassifierMixin, nn.Module):
    """A RepVGG-style classifier: RepConv stages (first block of each strided), global pool, linear head."""

    def __init__(
        self,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        depths: tuple[int, ...] = (1, 2, 4, 1),
        *,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem_width: int = 32,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.stem = RepConv(in_chans, stem_width, stride=2)
        stages, in_chs = [], stem_width
        self.feature_info = []
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks = [RepConv(in_chs if j == 0 else width, width, stride=2 if j == 0 else 1) for j in range(depth)]
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append({"num_chs": width, "reduction": 2 ** (i + 2), "module": f"stages.{i}"})
            in_chs = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, C, H/32, W/32)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))  # (B, C)
        return x if pre_logits else self.head(x)


@register_model(tags=("efficient", "reparam"))
def repconvnet_s(pretrained: bool = False, **kwargs: Any) -> RepConvNet:
    """Small RepVGG-style net (1.2 M params before fusion) for re-parameterisation demos and benchmarks."""
    return RepConvNet(**kwargs)
