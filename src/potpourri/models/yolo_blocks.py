"""Building blocks of the YOLOv6-style detector (``potpourri.models.yolo``): conv-BN, RepVGG runs, SPPF variants, BiC.

After ``meituan/YOLOv6`` v3 ``yolov6/layers/common.py`` (``ConvBNReLU``, ``RepBlock``, ``SimSPPF``, ``SimCSPSPPF``,
``BiFusion``); our own code. Every block folds into plain convs with ``reparameterize()`` (conv-BN and ``RepConv``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from potpourri.models.rep import RepConv, fold_bn

__all__ = ["BiC", "ConvBNAct", "RepBlock", "SimCSPSPPF", "SimSPPF"]


class ConvBNAct(nn.Module):
    """Conv (no bias) + BatchNorm + activation; ``reparameterize()`` folds the BN into the conv."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int = 1, stride: int = 1, *, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel, stride, kernel // 2, bias=False)
        self.bn: nn.Module = nn.BatchNorm2d(out_chs)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))  # (B, C_out, H/s, W/s)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the eval-mode BN into the conv's weight and bias; calling it again does nothing."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        weight, bias = fold_bn(self.conv.weight, self.conv.bias, self.bn)
        old = self.conv
        conv = nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=True)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        self.conv, self.bn = conv.to(weight.device), nn.Identity()

    switch_to_deploy = reparameterize


class RepBlock(nn.Module):
    """``n`` RepVGG blocks in a row; the first maps ``in_chs`` to ``out_chs`` (YOLOv6 ``RepBlock``)."""

    def __init__(self, in_chs: int, out_chs: int, n: int = 1):
        super().__init__()
        self.blocks = nn.Sequential(*[RepConv(in_chs if i == 0 else out_chs, out_chs) for i in range(max(1, n))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)  # (B, C_out, H, W)


class SimSPPF(nn.Module):
    """Spatial pyramid pooling, fast: 1×1 reduce, three chained 5×5 max-pools, concat, 1×1 (ReLU variant)."""

    def __init__(self, in_chs: int, out_chs: int, pool: int = 5):
        super().__init__()
        hidden = in_chs // 2
        self.reduce = ConvBNAct(in_chs, hidden, 1)
        self.pool = nn.MaxPool2d(pool, 1, pool // 2)
        self.expand = ConvBNAct(hidden * 4, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)  # (B, C/2, H, W)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.expand(torch.cat([x, y1, y2, self.pool(y2)], 1))  # (B, C_out, H, W)


class SimCSPSPPF(nn.Module):
    """CSP-split SPPF (YOLOv6 v3 ``SimCSPSPPF``): a 1×1 shortcut half and a 1×1-3×3-1×1 → SPPF pools → 1×1-3×3
    half, concatenated and merged by a 1×1; all ConvBNReLU."""

    def __init__(self, in_chs: int, out_chs: int, pool: int = 5, expansion: float = 0.5):
        super().__init__()
        hidden = max(1, int(out_chs * expansion))
        self.shortcut = ConvBNAct(in_chs, hidden, 1)
        self.pre = nn.Sequential(
            ConvBNAct(in_chs, hidden, 1), ConvBNAct(hidden, hidden, 3), ConvBNAct(hidden, hidden, 1)
        )
        self.pool = nn.MaxPool2d(pool, 1, pool // 2)
        self.post = nn.Sequential(ConvBNAct(4 * hidden, hidden, 1), ConvBNAct(hidden, hidden, 3))
        self.merge = ConvBNAct(2 * hidden, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.pre(x)  # (B, c, H, W)
        y1 = self.pool(x1)
        y2 = self.pool(y1)
        pooled = self.post(torch.cat([x1, y1, y2, self.pool(y2)], 1))  # (B, c, H, W)
        return self.merge(torch.cat([self.shortcut(x), pooled], 1))  # (B, C_out, H, W)


class BiC(nn.Module):
    """Bi-directional concatenation (YOLOv6 v3 ``BiFusion``): the deeper map upsampled by a 2×2 transposed conv,
    the current level by a 1×1, the shallower level by a 1×1 then a 3×3 stride-2 conv; concat → 1×1."""

    def __init__(self, deeper_chs: int, in_channels: Sequence[int], out_chs: int):
        super().__init__()
        current_chs, shallower_chs = in_channels
        self.upsample = nn.ConvTranspose2d(deeper_chs, out_chs, 2, 2, bias=True)
        self.current = ConvBNAct(current_chs, out_chs, 1)
        self.shallower = ConvBNAct(shallower_chs, out_chs, 1)
        self.downsample = ConvBNAct(out_chs, out_chs, 3, 2)
        self.merge = ConvBNAct(3 * out_chs, out_chs, 1)  # not `fuse`: timm's re-parameterisation walker calls .fuse()

    def forward(self, deeper: torch.Tensor, current: torch.Tensor, shallower: torch.Tensor) -> torch.Tensor:
        up = self.upsample(deeper)  # (B, C, h, w) from (B, C_d, h/2, w/2)
        down = self.downsample(self.shallower(shallower))  # (B, C, h, w) from (B, C_s, 2h, 2w)
        return self.merge(torch.cat([up, self.current(current), down], 1))  # (B, C, h, w)
