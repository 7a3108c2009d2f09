"""Feature sources of one-shot segmentation: the ``FeatureSource`` contract (class scores, class maps and
self-attention for a batch) and SLiMe's accumulated self-attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from potpourri.core.errors import PotpourriError


# ----------------------------------------------------------------------------------------------- feature sources
@dataclass
class AttentionMaps:
    """What a source gives the segmenter for a batch: class scores, class maps and the self-attention."""

    cross_logits: torch.Tensor  # (B, K, h, w) scores the CE loss reads
    cross: torch.Tensor  # (B, K, h, w) class maps (probabilities over classes), input of WAS
    self_attention: torch.Tensor  # (B, N, N), N = h·w, rows sum to 1
    aux_loss: torch.Tensor | None = None  # e.g. SD's noise-prediction loss

    @property
    def accumulated(self) -> torch.Tensor:
        """The WAS map, (B, K, h, w)."""
        return accumulated_self_attention(self.cross, self.self_attention)


class FeatureSource(nn.Module):
    """A frozen model that turns images and learned class tokens into ``AttentionMaps``.

    ``prepare`` runs once per image (no gradient); ``attend`` runs every optimisation step. A source with
    ``fixed_background`` keeps the background token fixed (SD's start token) and learns K-1 tokens.
    """

    name: str = "source"
    fixed_background: bool = False
    input_size: int | None = None  # the resolution the source wants, None = the segmenter's image size

    def freeze(self) -> None:
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.eval()

    def prepare(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen per-image state for (B, 3, S, S) images in [0, 1]."""
        raise NotImplementedError

    def attend(
        self,
        prepared: dict[str, torch.Tensor],
        tokens: torch.Tensor,
        *,
        train: bool,
        generator: torch.Generator,
        rows: Sequence[int] | None = None,
    ) -> AttentionMaps:
        """Attention of the prepared images to the learned ``tokens`` (n_learned, D); with ``rows``, of those images
        only (one process's slice under torchrun), random draws still made for all of them (one generator state)."""
        raise NotImplementedError

    def init_tokens(self, num_classes: int, generator: torch.Generator) -> torch.Tensor:
        """Starting values of the learned tokens, (n_learned, D)."""
        raise NotImplementedError

    def features(self, prepared: dict[str, torch.Tensor]) -> torch.Tensor:
        """Dense features (B, C, h, w) for the nearest-prototype baseline."""
        raise PotpourriError(f"the '{self.name}' source has no dense features; use --method slime")


# ----------------------------------------------------------------------------------------------- WAS math
def accumulated_self_attention(cross: torch.Tensor, self_attention: torch.Tensor) -> torch.Tensor:
    """SLiMe's weighted-accumulated self-attention: ``WAS[b,k,x] = Σ_j cross[b,k,j] · A[b,x,j]``.

    ``cross`` (B, K, h, w) class maps on the self-attention grid; ``self_attention`` (B, N, N), N = h·w, rows are
    queries x (each row sums to 1), columns keys j. Returns (B, K, h, w).
    """
    b, k, h, w = cross.shape
    if self_attention.shape != (b, h * w, h * w):
        raise PotpourriError(
            f"self-attention {tuple(self_attention.shape)} does not match class maps {tuple(cross.shape)}: "
            f"expected ({b}, {h * w}, {h * w})"
        )
    was = torch.einsum("bkj,bxj->bkx", cross.reshape(b, k, h * w), self_attention)  # (B, K, N)
    return was.reshape(b, k, h, w)
