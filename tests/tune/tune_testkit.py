"""Tiny models and data for the tuning tests; imported by the tests and by their subprocess scripts.

A uniquely named module (not ``conftest``): other test folders have their own rootless conftest.py.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset


class TinyBlock(nn.Module):
    """conv3x3 + BN + ReLU, then a 1×1 conv, with a residual connection."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv_pw = nn.Conv2d(width, width, 1)
        self.drop = nn.Dropout(0.0)  # parameter-free, like timm's drop-path: follows its block's train/eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H, W)
        return x + self.drop(self.conv_pw(torch.relu(self.bn(self.conv_dw(x)))))


class TinyNet(nn.Module):
    """A timm-shaped CNN in miniature: stem, two stages of blocks, neck, classifier."""

    def __init__(self, num_classes: int = 3, width: int = 8, *, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(nn.Sequential(TinyBlock(width), TinyBlock(width)), nn.Sequential(TinyBlock(width)))
        self.conv_head = nn.Conv2d(width, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(16, num_classes)

    num_features = 16

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 16, H/2, W/2)
        x = torch.relu(self.bn1(self.conv_stem(x)))  # (B, C, H/2, W/2)
        x = self.blocks(x)  # (B, C, H/2, W/2)
        return torch.relu(self.bn2(self.conv_head(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:  # -> (B, 16) or (B, K)
        x = self.drop(x.mean((2, 3)))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, K)
        return self.forward_head(self.forward_features(x))


TINY_BLOCKS = ["stem", "blocks.0.0", "blocks.0.1", "blocks.1.0", "neck", "head"]


def tiny_model(seed: int = 0, num_classes: int = 3, *, drop_rate: float = 0.0) -> TinyNet:
    """A seeded TinyNet with non-trivial BN running stats."""
    torch.manual_seed(seed)
    model = TinyNet(num_classes, drop_rate=drop_rate)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def colour_data(n: int = 48, *, size: int = 8, num_classes: int = 3, seed: int = 0) -> TensorDataset:
    """Noise images whose class is the brightest colour channel: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randn(n, 3, size, size, generator=gen) * 0.5
    images[torch.arange(n), labels] += 1.0
    return TensorDataset(images, labels)
