"""The classifier half of timm's model contract, shared by our backbones."""

from __future__ import annotations

import torch
import torch.nn as nn


class ClassifierMixin:
    """``forward``, ``get_classifier`` and ``reset_classifier`` for a model with a linear ``head`` on pooled
    ``num_features``; the model supplies ``forward_features`` and ``forward_head``."""

    head: nn.Module
    num_features: int
    num_classes: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
