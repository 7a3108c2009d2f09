"""Siamese SubTuning (Kaplun et al., "Less is More: Selective Layer Finetuning with SubTuning", low-data variant).

The network is copied: one copy keeps its pretrained weights, frozen; in the other the chosen blocks are fine-tuned
(the ``siamese-subtuning`` strategy). The head sees both copies' pooled features side by side (2x width), so the
tuned blocks can only add to what the pretrained features already say. As in the authors' code
(``use_frozen_bb=True``), the whole backbone is duplicated; here the frozen copy runs without gradients.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn as nn

from potpourri.core.errors import PotpourriError
from potpourri.models.blocks import block_map

__all__ = ["SiameseSubTuned"]


class SiameseSubTuned(nn.Module):
    """``tuned`` and a frozen copy of a timm-style classifier; ``head`` reads their concatenated pooled features."""

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        if not all(hasattr(model, a) for a in ("reset_classifier", "forward_features", "forward_head")):
            raise PotpourriError(f"Siamese SubTuning needs a timm-style classifier; got {type(model).__name__}")
        model.reset_classifier(0)  # forward_head(pre_logits=True) gives the pooled features
        self.tuned = model
        self.frozen = copy.deepcopy(model).requires_grad_(False)
        self.frozen.keep_frozen = True  # no strategy trains it (tune.strategies.frozen_by_design)
        self.num_features = int(model.num_features)
        self.num_classes = num_classes
        self.head = nn.Linear(2 * self.num_features, num_classes)

    def block_map(self) -> OrderedDict[str, list[str]]:
        """The tuned copy's block map under its own entry names (``blocks.5.3`` …), then ``frozen`` and ``head``."""
        inner = block_map(self.tuned)
        inner.pop("head", None)  # the inner classifier is an Identity now
        bmap = OrderedDict((entry, [f"tuned.{p}" for p in prefixes]) for entry, prefixes in inner.items())
        bmap["frozen"] = ["frozen"]
        bmap["head"] = ["head"]
        return bmap

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, K)
        tuned = self.tuned.forward_head(self.tuned.forward_features(images), pre_logits=True)  # (B, C)
        with torch.no_grad():
            frozen = self.frozen.forward_head(self.frozen.forward_features(images), pre_logits=True)  # (B, C)
        return self.head(torch.cat([tuned, frozen], dim=1))  # (B, K)
