"""A fitted PatchCore as one ``nn.Module`` made of exportable ops: backbone → patch aggregation → nearest-neighbour
search against the memory bank (an initializer of the graph) → image score (paper eq. 7) and smoothed anomaly map.

``PatchCoreGraph(method)(x)`` equals ``method.score`` on the same normalised input up to float rounding (the search
uses ``‖p‖² − 2 p·m + ‖m‖²`` as ``torch.cdist`` does for these sizes); ``deploy.export.export_patchcore`` traces it
to ONNX, so ONNX Runtime and OpenVINO run the whole method with no Python-side search.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.inspect.patchcore import PatchCore
from potpourri.models.layers import gaussian_blur

__all__ = ["PatchCoreGraph"]


class PatchCoreGraph(nn.Module):
    """``(B, 3, S, S)`` normalised images → ``(scores (B,), anomaly maps (B, S, S))`` of a fitted PatchCore."""

    def __init__(self, method: PatchCore) -> None:
        super().__init__()
        bank = method.memory_bank
        if bank is None:
            raise PotpourriError("PatchCoreGraph needs a fitted PatchCore: fit one or load an `inspect fit` run")
        self.features = method.features.cpu().eval()
        self.register_buffer("bank", bank.float().contiguous())  # (K, D)
        self.register_buffer("bank_sq", bank.float().pow(2).sum(1))  # (K,)
        self.k = min(method.config.num_neighbors, bank.shape[0])
        size = method.config.image_size
        with torch.no_grad():
            channels = sum(t.shape[1] for t in self.features.taps(torch.zeros(1, 3, size, size)))
        # PatchFeatures averages neighbouring channels down to embed_dim (adaptive pooling, not exportable): the same
        # linear map as a (D, C) matrix, built by pooling the identity
        pool = F.adaptive_avg_pool1d(torch.eye(channels)[:, None, :], self.features.embed_dim)[:, 0, :].T
        self.register_buffer("pool", pool.contiguous() if channels != self.features.embed_dim else torch.empty(0))
        self.size = method.config.image_size
        self.sigma = method.config.sigma
        self.upsample = method.config.map_upsample

    def squared_distances(self, queries: torch.Tensor) -> torch.Tensor:
        """Squared distances ``(..., K)`` of each row of ``queries`` ``(..., D)`` to every bank row."""
        return queries.pow(2).sum(-1, keepdim=True) - 2 * queries @ self.bank.T + self.bank_sq

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``PatchFeatures.forward`` with the channel pooling as a matrix product: (B, D, h, w)."""
        taps = [self.features.aggregate(t) for t in self.features.taps(images)]
        grid = taps[0].shape[-2:]
        taps = [t if t.shape[-2:] == grid else F.interpolate(t, size=grid, mode="bilinear") for t in taps]
        features = torch.cat(taps, dim=1)  # (B, C, h, w)
        if self.pool.numel():
            features = torch.einsum("dc,bchw->bdhw", self.pool, features)
        return features

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embed(images)  # (B, D, h, w)
        b, d, h, w = features.shape
        patches = features.permute(0, 2, 3, 1).reshape(b, h * w, d)  # (B, hw, D)
        d2 = self.squared_distances(patches)  # (B, hw, K)
        # a plain reduction: an index over the whole (hw, K) matrix (TopK / ArgMin) took half of OpenVINO's time
        distance = d2.amin(-1).clamp_min(0).sqrt()  # (B, hw)
        top = distance.argmax(1, keepdim=True)  # (B, 1): the most anomalous patch
        best = distance.gather(1, top)[:, 0]  # (B,)
        if self.k > 1:  # reweight by how isolated its nearest bank patch is; only its row needs an index
            row = d2.gather(1, top[:, :, None].expand(b, 1, d2.shape[-1]))[:, 0]  # (B, K)
            anchor = self.bank[row.argmin(-1)]  # (B, D)
            d2 = anchor.pow(2).sum(-1, keepdim=True) - 2 * anchor @ self.bank.T + self.bank_sq  # (B, K)
            support = d2.topk(self.k, dim=1, largest=False).indices  # (B, k)
            test = patches.gather(1, top[:, :, None].expand(b, 1, d))  # (B, 1, D)
            spread = torch.linalg.vector_norm(self.bank[support] - test, dim=-1)  # (B, k)
            best = (1 - torch.softmax(spread, dim=1)[:, 0]) * best
        upsampled = F.interpolate(distance.view(b, 1, h, w), size=(self.size, self.size), mode=self.upsample)
        return best, gaussian_blur(upsampled[:, 0], self.sigma)
