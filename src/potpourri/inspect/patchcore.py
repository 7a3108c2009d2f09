"""PatchCore (Roth et al., CVPR 2022): a memory bank of normal patch features from any timm backbone (default: the
offline ImageNet EfficientNet-Lite0).

Reading order: patch feature extractor (a pure ``nn.Module``) → greedy k-center coreset → chunked nearest
neighbours → anomaly maps → the ``PatchCore`` method (fit / score / save) → config and memory budget.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from potpourri.core.distributed import ProcessGroup, current_group, shard_bounds
from potpourri.core.errors import PotpourriError
from potpourri.core.imaging import ImageInput, as_rgb
from potpourri.inspect.base import InspectionMethod
from potpourri.models.layers import gaussian_blur

__all__ = [
    "METHOD",
    "PatchCore",
    "PatchCoreConfig",
    "PatchFeatures",
    "bank_dtype",
    "coreset_slices",
    "default_layers",
    "greedy_coreset",
    "memory_budget",
    "nearest_neighbors",
    "partitioned_coreset",
    "slice_coreset",
    "tile_grid",
]


class PatchFeatures(nn.Module):
    """Locally aware patch features: two backbone stages, 3×3 average, upsampled to one grid, pooled to ``embed_dim``.

    EfficientNet-style backbones (``conv_stem``, ``bn1``, ``blocks``) tap ``blocks[i]`` for each ``i`` in ``layers``
    and never run the later blocks; any other timm model taps its ``forward_intermediates`` at indices ``layers``
    (ResNet / WideResNet stages, ConvNeXt stages, ViT blocks as patch grids). Example:
        features = PatchFeatures(create_model("efficientnet_lite0", pretrained=True))(x)  # (B, 152, H/8, W/8)
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        layers: Sequence[int] = (2, 4),
        neighbourhood: int = 3,
        embed_dim: int = 152,
        border_zero_pad: bool = True,
    ) -> None:
        super().__init__()
        self.layers = tuple(sorted(layers))
        self.efficientnet = all(hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks"))
        if self.efficientnet:
            if not layers or max(layers) >= len(backbone.blocks) or min(layers) < 0:
                raise PotpourriError(
                    f"PatchCore layers {list(layers)} must be block indices 0..{len(backbone.blocks) - 1}"
                )
            self.stem = nn.Sequential(backbone.conv_stem, backbone.bn1)
            self.blocks = nn.ModuleList(backbone.blocks[: self.layers[-1] + 1])  # later blocks are never run
        else:
            if not hasattr(backbone, "forward_intermediates"):
                raise PotpourriError(
                    f"PatchCore cannot tap {type(backbone).__name__}: use an EfficientNet or a timm model with "
                    "forward_intermediates (ResNet, WideResNet, ConvNeXt, ViT, ...)"
                )
            count = len(getattr(backbone, "feature_info", []) or []) or len(getattr(backbone, "blocks", []))
            if not layers or min(layers) < 0 or (count and max(layers) >= count):
                raise PotpourriError(f"PatchCore layers {list(layers)} must be feature indices 0..{count - 1}")
            self.backbone = backbone
        # zero padding counts in the border average, as in PatchCore's unfold and anomalib: measured on DS-Synth,
        # leaving it out (average of the valid cells only) drops mean image AUROC from 0.807 to 0.612
        self.aggregate = nn.AvgPool2d(
            neighbourhood, stride=1, padding=neighbourhood // 2, count_include_pad=border_zero_pad
        )
        self.embed_dim = embed_dim

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The raw feature maps at ``layers``, each (B, C_i, H/s_i, W/s_i)."""
        if not self.efficientnet:
            return list(self.backbone.forward_intermediates(images, indices=list(self.layers), intermediates_only=True))
        x = self.stem(images)  # (B, 32, H/2, W/2)
        taps = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.layers:
                taps.append(x)
        return taps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        taps = [self.aggregate(t) for t in self.taps(images)]
        grid = taps[0].shape[-2:]
        taps = [t if t.shape[-2:] == grid else F.interpolate(t, size=grid, mode="bilinear") for t in taps]
        features = torch.cat(taps, dim=1)  # (B, C, h, w), C = sum of C_i (152 for blocks 2 and 4)
        b, c, h, w = features.shape
        if c != self.embed_dim:
            # average neighbouring channels down to a fixed width, as PatchCore's adaptive pooling does
            flat = features.permute(0, 2, 3, 1).reshape(b * h * w, 1, c)  # (B*h*w, 1, C)
            flat = F.adaptive_avg_pool1d(flat, self.embed_dim)  # (B*h*w, 1, D)
            features = flat.reshape(b, h, w, self.embed_dim).permute(0, 3, 1, 2)
        return features.contiguous()  # (B, D, h, w)


def tile_grid(image: Image.Image, size: int, overlap: float) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Overlapping ``size`` x ``size`` tiles covering ``image`` (the last row and column flush with its edges) and
    their (top, left) corners; an image smaller than a tile in either side is one tile (the whole image)."""
    if not 0 <= overlap < 1:
        raise PotpourriError(f"tile_overlap must be in [0, 1), got {overlap}")
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    if height < size or width < size:
        return [pixels], [(0, 0)]
    stride = max(1, round(size * (1 - overlap)))

    def starts(length: int) -> list[int]:
        out = list(range(0, length - size + 1, stride))
        return out if out[-1] == length - size else [*out, length - size]

    corners = [(top, left) for top in starts(height) for left in starts(width)]
    return [pixels[t : t + size, left : left + size] for t, left in corners], corners


def default_layers(backbone: nn.Module) -> tuple[int, ...]:
    """The taps PatchCore uses when none are given: blocks 2 and 4 of an EfficientNet; else the first stages at
    strides 8 and 16 (ResNet layer2 + layer3, as anomalib; ConvNeXt stages 1 + 2); for a plain ViT (one stride) the
    blocks at a third and two thirds of its depth."""
    if all(hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks")):
        return (2, 4)
    info = getattr(backbone, "feature_info", None)
    reductions = [f["reduction"] for f in info] if info else []
    if 8 in reductions and 16 in reductions:
        return (reductions.index(8), reductions.index(16))
    depth = len(reductions) or len(getattr(backbone, "blocks", []))
    if depth < 2:
        raise PotpourriError(f"cannot choose PatchCore layers for {type(backbone).__name__}; pass --layers")
    return (depth // 3, 2 * depth // 3)


@contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Temporarily run torch ops on ``count`` threads (None: leave as is)."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def greedy_coreset(
    features: torch.Tensor,
    n_select: int,
    *,
    projection_dim: int | None = None,
    seed: int = 0,
    threads: int | None = 1,
) -> torch.Tensor:
    """Indices of ``n_select`` rows picked by greedy k-center (farthest point) selection, first row seeded.

    Distances use an optional Gaussian random projection; all per-step work writes into preallocated buffers,
    so memory stays flat over thousands of iterations (stock anomalib grows ~20 MB per step on this machine).
    Each step is a memory-bound matrix-vector product, so the loop runs on ``threads`` (default 1): thread
    synchronisation per tiny op cost far more than it saved on 2 shared cores (about 10 µs vs 8 ms per step).
    """
    n_rows = features.shape[0]
    if not 0 < n_select <= n_rows:
        raise PotpourriError(f"coreset size {n_select} must be in 1..{n_rows} (the number of patches)")
    generator = torch.Generator().manual_seed(seed)
    points = features.float()
    if projection_dim is not None and projection_dim < features.shape[1]:
        projection = torch.randn(features.shape[1], projection_dim, generator=generator) / math.sqrt(projection_dim)
        points = points @ projection  # (N, P)
    squared_norms = torch.linalg.vector_norm(points, dim=1).square_()  # (N,), without an (N, D) temporary
    min_distance = torch.full((n_rows,), float("inf"))
    distance = torch.empty(n_rows)
    centre = torch.empty(points.shape[1])
    selected = torch.empty(n_select, dtype=torch.long)
    index = int(torch.randint(n_rows, (1,), generator=generator))
    with _torch_threads(threads):
        for step in range(n_select):
            selected[step] = index
            # squared distance of every point to the newest centre: |x|^2 - 2 x.c + |c|^2, in place
            centre.copy_(points[index])
            torch.mv(points, centre, out=distance)
            distance.mul_(-2).add_(squared_norms).add_(squared_norms[index]).clamp_(min=0)
            torch.minimum(min_distance, distance, out=min_distance)
            index = int(torch.argmax(min_distance))
    return selected


def coreset_slices(n_rows: int, max_rows: int) -> list[tuple[int, int]]:
    """The contiguous ``[lo, hi)`` row slices of a partitioned coreset: as equal as can be, at most ``max_rows`` each.

    The one slice definition, shared by ``partitioned_coreset`` and the distributed fit, so both keep the same rows.
    """
    parts = max(1, math.ceil(n_rows / max_rows))
    bounds = [round(i * n_rows / parts) for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def slice_coreset(
    rows: torch.Tensor, ratio: float, part: int, *, projection_dim: int | None = None, seed: int = 0,
    threads: int | None = 1,
) -> torch.Tensor:  # fmt: skip
    """Indices into ``rows`` that greedy k-center keeps of slice ``part``: ``ratio`` of it, seeded ``seed + part``."""
    n_select = max(1, math.ceil(ratio * rows.shape[0]))
    return greedy_coreset(rows, n_select, projection_dim=projection_dim, seed=seed + part, threads=threads)


def partitioned_coreset(
    features: torch.Tensor,
    ratio: float,
    max_rows: int,
    *,
    projection_dim: int | None = None,
    seed: int = 0,
    threads: int | None = 1,
) -> torch.Tensor:
    """Greedy k-center per contiguous slice of at most ``max_rows`` rows, each keeping ``ratio`` of its rows.

    A composable coreset (Indyk et al., 2014): every row is covered within its own slice's greedy radius, and the
    cost falls from ``ratio·N²`` to ``ratio·N·max_rows`` distance evaluations, so 1,000 training images take minutes,
    not most of an hour. With one slice it is exactly ``greedy_coreset``.
    """
    if not 0 < ratio <= 1:
        raise PotpourriError(f"coreset ratio {ratio} must be in (0, 1]")
    chosen = []
    for part, (lo, hi) in enumerate(coreset_slices(features.shape[0], max_rows)):
        picked = slice_coreset(features[lo:hi], ratio, part, projection_dim=projection_dim, seed=seed, threads=threads)
        chosen.append(picked + lo)
    return torch.cat(chosen)


def _faiss_nearest(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import faiss
    except ImportError as exc:
        raise PotpourriError(
            "nn_backend='faiss' needs faiss: pip install faiss-cpu (or use nn_backend='torch')"
        ) from exc
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatL2(bank.shape[1])  # exact search, like the torch path
    index.add(np.ascontiguousarray(bank.numpy(), dtype=np.float32))
    squared, found = index.search(np.ascontiguousarray(queries.numpy(), dtype=np.float32), k)
    return torch.from_numpy(squared).clamp_(min=0).sqrt_(), torch.from_numpy(found).long()


def nearest_neighbors(
    queries: torch.Tensor,
    bank: torch.Tensor,
    *,
    k: int = 1,
    chunk_bytes: int = 128 << 20,
    backend: str = "torch",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (M, k) and indices (M, k) of each query's k nearest bank rows.

    The torch backend works in query chunks whose (chunk, K) distance matrix fits ``chunk_bytes``; 'faiss' uses
    an exact flat index when faiss-cpu is installed.
    """
    if k > bank.shape[0]:
        raise PotpourriError(f"k={k} nearest neighbours requested from a memory bank of {bank.shape[0]} rows")
    if backend == "faiss":
        return _faiss_nearest(queries, bank, k)
    if backend != "torch":
        raise PotpourriError(f"unknown nearest-neighbour backend '{backend}'; use 'torch' or 'faiss'")
    rows = max(1, chunk_bytes // (4 * bank.shape[0]))
    distances, indices = [], []
    for start in range(0, queries.shape[0], rows):
        block = torch.cdist(queries[start : start + rows], bank)  # (chunk, K)
        d, i = block.topk(k, dim=1, largest=False)  # (chunk, k)
        distances.append(d)
        indices.append(i)
    return torch.cat(distances), torch.cat(indices)


@dataclass
class PatchCoreConfig:
    """Everything that defines a PatchCore model (saved in ``metadata.json``)."""

    backbone: str = "efficientnet_lite0"  # a registered model or any timm name (``timm/wide_resnet50_2``)
    # Lite0: blocks.2 (stride 8, 40 ch) and blocks.4 (stride 16, 112 ch); () = default_layers(backbone)
    layers: tuple[int, ...] = (2, 4)
    pretrained: bool = True  # False: random weights (tests, or a backbone whose weights are not on disk)
    image_size: int = 224
    neighbourhood: int = 3
    # Lite0 blocks 2 + 4 have 152 channels, so no channel pooling: pooling to 128 cost DS-Synth image AUROC
    # (gravel -0.047, moon -0.034 vs anomalib; unpooled +0.018 / -0.022, issue 21); wider backbones pool to 152
    embed_dim: int = 152
    coreset_ratio: float = 0.1
    projection_dim: int | None = 64  # random projection for coreset distances; None = exact
    num_neighbors: int = 9  # image-score reweighting (paper eq. 7); 1 = plain max patch distance
    sigma: float = 4.0  # Gaussian smoothing of the map, in input pixels
    map_upsample: str = "bilinear"  # patch grid -> input size before smoothing; anomalib uses "nearest"
    k_shot: int | None = None  # few-shot: fit on k seeded normal images only
    batch_size: int = 4  # 8 raised the fit's peak RSS by ~55 MiB (Lite0 activations) at no measured speed gain
    chunk_bytes: int = 128 << 20
    nn_backend: str = "torch"  # or "faiss" (pip install faiss-cpu); torch is the reference
    coreset_threads: int | None = 1  # see greedy_coreset
    # greedy selection runs per slice of at most this many patches (a composable coreset; see partitioned_coreset);
    # None = one greedy pass over the whole bank (quadratic: ~46 min for 1,000 images at 224 px)
    coreset_max_patches: int | None = 100_000
    border_zero_pad: bool = True  # see PatchFeatures; runs saved before this option used False
    # high-resolution parts: cut images larger than image_size into overlapping image_size tiles at their own
    # resolution (fit and predict alike) instead of shrinking them; maps are stitched, the image score is the max
    tile: bool = False
    tile_overlap: float = 0.25
    # "float16": the kept coreset rows are rounded to half precision (half the stored bytes; the search stays float32,
    # scores move by < 1e-3 relative, tested). Selection runs on the float32 bank: greedy k-center is chaotic, and
    # a float16 full bank changed the chosen rows enough to move one set's image AUROC by 0.05 (issue 21)
    bank_dtype: str = "float16"
    seed: int = 0


def bank_dtype(config: PatchCoreConfig) -> torch.dtype:
    """The dtype the coreset is stored in (``config.bank_dtype``)."""
    if config.bank_dtype not in ("float16", "float32"):
        raise PotpourriError(f"bank_dtype '{config.bank_dtype}' is not 'float16' or 'float32'")
    return getattr(torch, config.bank_dtype)


def memory_budget(config: PatchCoreConfig, n_images: int, grid: tuple[int, int]) -> dict[str, int]:
    """Bytes of the full float32 patch bank, the projection and buffers of one coreset slice and the kept rows (the
    peak while fitting, on top of the backbone), the stored coreset (``memory_bank``) and its float32 search copy."""
    patches = n_images * grid[0] * grid[1]
    width = bank_dtype(config).itemsize
    full = patches * config.embed_dim * 4
    rows = min(patches, config.coreset_max_patches or patches)  # one slice at a time
    work = rows * config.projection_dim * 4 if config.projection_dim else 0
    buffers = rows * 4 * 3  # squared norms, running minimum, step distances (float32)
    kept = max(1, math.ceil(config.coreset_ratio * patches)) * config.embed_dim
    return {"patches": patches, "full_bank": full, "fit_peak": full + work + buffers + kept * 4,
            "memory_bank": kept * width, "search_bank": kept * 4}  # fmt: skip


class PatchCore(InspectionMethod):
    """PatchCore: a coreset of normal patch features; a patch's anomaly = distance to its nearest normal patch.

    Example:
        model = PatchCore(PatchCoreConfig(image_size=224)).fit(good_paths); results = model.predict(test_paths)
    """

    name = "patchcore"
    config_class = PatchCoreConfig
    devices = ("cpu", "cuda")

    def __init__(self, config: PatchCoreConfig | None = None, *, backbone: nn.Module | None = None) -> None:
        super().__init__(config or PatchCoreConfig())
        if self.config.map_upsample not in ("bilinear", "nearest"):
            raise PotpourriError(f"map_upsample '{self.config.map_upsample}' is not 'bilinear' or 'nearest'")
        self._backbone = backbone
        self._features: PatchFeatures | None = None
        self.memory_bank: torch.Tensor | None = None
        self.n_train_images = 0
        self.world_size = 1  # processes the fit ran in (torchrun)
        self.timings: dict[str, float] = {}

    @property
    def features(self) -> PatchFeatures:
        if self._features is None:
            from potpourri.core.registry import create_model

            backbone = self._backbone or create_model(self.config.backbone, pretrained=self.config.pretrained)
            if not self.config.layers:
                self.config.layers = default_layers(backbone)
            self._features = PatchFeatures(
                backbone,
                layers=self.config.layers,
                neighbourhood=self.config.neighbourhood,
                embed_dim=self.config.embed_dim,
                border_zero_pad=self.config.border_zero_pad,
            ).eval()
            cfg = getattr(backbone, "pretrained_cfg", None) or {}
            self._mean_std = tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))
        return self._features

    @property
    def normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) the backbone's inputs are normalised with (from its pretrained config)."""
        self.features  # noqa: B018  (builds the backbone, which sets them)
        return self._mean_std

    def _tensor(self, image: ImageInput) -> torch.Tensor:
        size = self.config.image_size
        rgb = as_rgb(image)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)
        mean, std = self._mean_std
        return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)

    @torch.inference_mode()
    def embed(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Patch features of images, (N, D, h, w), computed in batches."""
        from potpourri.core.training import autocast

        extractor = self.features.to(self.device)
        out = []
        for start in range(0, len(images), self.config.batch_size):
            batch = torch.stack([self._tensor(i) for i in images[start : start + self.config.batch_size]])
            with autocast(self.device, self.precision):
                features = extractor(batch.to(self.device))  # (B, D, h, w)
            out.append(features.float().cpu())  # the bank and the neighbour search stay in fp32 on the CPU
        return torch.cat(out)

    @torch.inference_mode()
    def grid(self) -> tuple[int, int]:
        """The patch grid (h, w) at the configured image size."""
        size = self.config.image_size
        h, w = self.features.to(self.device)(torch.zeros(1, 3, size, size, device=self.device)).shape[-2:]
        return int(h), int(w)

    @torch.inference_mode()
    def fit(self, images: Sequence[ImageInput]) -> PatchCore:
        """Embed normal images into one preallocated bank, then keep a greedy coreset of it.

        Under torchrun (a joined process group) every process calls it with the same images, embeds and selects
        only its share of the coreset slices, and receives the gathered bank: one process's, row for row."""
        images = list(images)
        if not images:
            raise PotpourriError("PatchCore.fit got no training images")
        if self.config.k_shot is not None:
            if not 0 < self.config.k_shot <= len(images):
                raise PotpourriError(f"k_shot={self.config.k_shot} but only {len(images)} normal images given")
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.config.seed))
            images = [images[i] for i in order[: self.config.k_shot].tolist()]
        n_images = len(images)
        if self.config.tile:
            images = [t for image in images for t in tile_grid(as_rgb(image), self.config.image_size,
                                                               self.config.tile_overlap)[0]]  # fmt: skip
        group = current_group()
        if group.distributed:
            bank = self._distributed_bank(images, group)
        else:
            start = time.perf_counter()
            bank = self._embed_rows(images)
            self.timings["embed_s"] = time.perf_counter() - start
            start = time.perf_counter()
            n_select = max(1, math.ceil(self.config.coreset_ratio * bank.shape[0]))
            if n_select < bank.shape[0]:
                chosen = partitioned_coreset(
                    bank,
                    self.config.coreset_ratio,
                    self.config.coreset_max_patches or bank.shape[0],
                    projection_dim=self.config.projection_dim,
                    seed=self.config.seed,
                    threads=self.config.coreset_threads,
                )
                bank = bank[chosen]
            self.timings["coreset_s"] = time.perf_counter() - start
        # rounded to the storage dtype now, so a fitted model and its saved run score alike; searched in float32
        self.memory_bank = bank.to(bank_dtype(self.config)).float()
        self.n_train_images = n_images
        self.world_size = group.world
        return self

    def _embed_rows(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Patch rows (N*h*w, D) of ``images`` in batches of ``batch_size`` from the first, into one preallocated
        bank (no list + cat copy)."""
        from tqdm.auto import tqdm

        h, w = self.grid()
        bank = torch.empty(len(images) * h * w, self.config.embed_dim)
        batches = range(0, len(images), self.config.batch_size)
        for first in tqdm(batches, desc="PatchCore fit", unit="batch", leave=False, disable=None):  # None: a TTY only
            features = self.embed(images[first : first + self.config.batch_size])  # (B, D, h, w)
            rows = features.permute(0, 2, 3, 1).reshape(-1, self.config.embed_dim)  # (B*h*w, D)
            bank[first * h * w : first * h * w + rows.shape[0]] = rows
        return bank

    def _distributed_bank(self, images: list, group: ProcessGroup) -> torch.Tensor:
        """The coreset of ``images`` from every process: each embeds the images of its contiguous block of
        ``coreset_slices`` (in the single process's batches, so features match bit for bit), selects per slice,
        and the kept rows are gathered in slice order."""
        h, w = self.grid()
        per_image, size = h * w, self.config.batch_size
        total = len(images) * per_image
        keep_all = max(1, math.ceil(self.config.coreset_ratio * total)) >= total  # one process keeps the whole bank
        slices = coreset_slices(total, self.config.coreset_max_patches or total)
        first_part, stop_part = shard_bounds(len(slices), group.rank, group.world)
        kept = [torch.empty(0, self.config.embed_dim)]
        start = time.perf_counter()
        if first_part < stop_part:
            lo, hi = slices[first_part][0], slices[stop_part - 1][1]
            first = lo // per_image // size * size  # the start of the single-process batch that holds row lo
            stop = min(len(images), -(-math.ceil(hi / per_image) // size) * size)
            rows = self._embed_rows(images[first:stop])
            self.timings["embed_s"] = time.perf_counter() - start
            start = time.perf_counter()
            for part in range(first_part, stop_part):
                chunk = rows[slices[part][0] - first * per_image : slices[part][1] - first * per_image]
                if not keep_all:
                    chunk = chunk[slice_coreset(chunk, self.config.coreset_ratio, part,
                                                projection_dim=self.config.projection_dim, seed=self.config.seed,
                                                threads=self.config.coreset_threads)]  # fmt: skip
                kept.append(chunk)
        self.timings["coreset_s"] = time.perf_counter() - start
        return torch.cat(group.all_gather(torch.cat(kept)))  # rank order is slice order: blocks are contiguous

    def _require_fit(self) -> torch.Tensor:
        if self.memory_bank is None:
            raise PotpourriError("PatchCore is not fitted: call fit(normal_images) or load a fitted run first")
        return self.memory_bank

    def tiled(self, image: ImageInput) -> tuple[float, np.ndarray]:
        """Score one image tile by tile: (max tile score, the stitched map at the image's own size; overlaps are
        averaged)."""
        rgb = as_rgb(image)
        tiles, corners = tile_grid(rgb, self.config.image_size, self.config.tile_overlap)
        size = self.config.image_size
        if len(tiles) == 1 and rgb.size != (size, size):  # smaller than a tile: scored whole, as without tiling
            scores, maps = self.score_tiles(tiles)
            full = F.interpolate(torch.from_numpy(maps)[:, None], size=(rgb.height, rgb.width), mode="bilinear")
            return float(scores[0]), full[0, 0].numpy()
        scores, maps = self.score_tiles(tiles)
        total = np.zeros((rgb.height, rgb.width), np.float32)
        count = np.zeros_like(total)
        for (top, left), tile_map in zip(corners, maps, strict=True):
            total[top : top + size, left : left + size] += tile_map
            count[top : top + size, left : left + size] += 1
        return float(scores.max()), total / count

    def predict(self, images: Sequence[ImageInput]) -> list:
        """As ``InspectionMethod.predict``; with ``tile``, maps and masks come at each image's own size."""
        if not self.config.tile:
            return super().predict(images)
        out = []
        for image in images:
            score, full = self.tiled(image)
            out += self.results(np.array([score]), full[None])
        return out

    @torch.inference_mode()
    def score(self, images: Sequence[ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (N,) and Gaussian-smoothed anomaly maps (N, S, S) at the input size S (with ``tile``: the
        stitched map of each image, resized to S x S)."""
        if self.config.tile:
            size = self.config.image_size
            results = [self.tiled(image) for image in images]
            maps = [F.interpolate(torch.from_numpy(m)[None, None], size=(size, size), mode="bilinear")[0, 0].numpy()
                    for _, m in results]  # fmt: skip
            return np.array([s for s, _ in results], np.float32), np.stack(maps)
        return self.score_tiles(images)

    @torch.inference_mode()
    def score_tiles(self, images: Sequence[ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N,) and maps (N, S, S) of images each resized to S x S (a tile already is)."""
        bank = self._require_fit()
        if not len(images):
            raise PotpourriError("PatchCore.score got no images")
        scores, maps = [], []
        for first in range(0, len(images), self.config.batch_size):
            features = self.embed(list(images[first : first + self.config.batch_size]))  # (B, D, h, w)
            b, d, h, w = features.shape
            patches = features.permute(0, 2, 3, 1).reshape(-1, d)  # (B*h*w, D)
            distance, nearest = nearest_neighbors(
                patches, bank, k=1, chunk_bytes=self.config.chunk_bytes, backend=self.config.nn_backend
            )
            patch_scores = distance[:, 0].view(b, h * w)  # (B, h*w)
            scores.append(self._image_scores(patches.view(b, h * w, d), patch_scores, nearest[:, 0].view(b, h * w)))
            size = self.config.image_size
            upsampled = F.interpolate(patch_scores.view(b, 1, h, w), size=(size, size), mode=self.config.map_upsample)
            maps.append(gaussian_blur(upsampled[:, 0], self.config.sigma))  # (B, S, S)
        return torch.cat(scores).numpy(), torch.cat(maps).numpy()

    def _image_scores(self, patches: torch.Tensor, patch_scores: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
        """Max patch distance, reweighted by how isolated its nearest bank patch is (PatchCore eq. 7)."""
        bank = self._require_fit()
        top = patch_scores.argmax(1)  # (B,)
        best = patch_scores.gather(1, top[:, None])[:, 0]  # (B,)
        k = min(self.config.num_neighbors, bank.shape[0])
        if k <= 1:
            return best
        rows = torch.arange(patches.shape[0])
        anchor = bank[nearest[rows, top]]  # (B, D): the bank patch nearest to the most anomalous test patch
        _, support = nearest_neighbors(anchor, bank, k=k, chunk_bytes=self.config.chunk_bytes)  # (B, k)
        distance = torch.linalg.vector_norm(bank[support] - patches[rows, top][:, None], dim=-1)  # (B, k)
        weight = 1 - torch.softmax(distance, dim=1)[:, 0]
        return weight * best

    @classmethod
    def from_metadata(cls, metadata: dict, folder) -> PatchCore:
        """Load a fitted PatchCore; runs saved before ``border_zero_pad`` / ``bank_dtype`` keep their old behaviour."""
        metadata = {**metadata, "config": {"border_zero_pad": False, "bank_dtype": "float32", **metadata["config"]}}
        return super().from_metadata(metadata, folder)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"memory_bank": self._require_fit().to(bank_dtype(self.config))}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if "memory_bank" not in tensors:
            raise PotpourriError("the saved tensors hold no 'memory_bank': not a PatchCore run; refit")
        bank = tensors["memory_bank"].float()
        if bank.ndim != 2 or bank.shape[1] != self.config.embed_dim:
            raise PotpourriError(
                f"memory bank {tuple(bank.shape)} does not match embed_dim={self.config.embed_dim}; refit the model"
            )
        self.memory_bank = bank


def config_from_args(args: Any) -> PatchCoreConfig:
    """``potpourri inspect fit`` arguments as a config."""
    return PatchCoreConfig(
        backbone=args.backbone,
        layers=tuple(args.layers) if args.layers else (),  # () = default_layers of the backbone
        pretrained=args.pretrained,
        image_size=args.image_size,
        coreset_ratio=args.coreset_ratio,
        k_shot=args.k_shot,
        tile=getattr(args, "tile", False),
        nn_backend=args.nn_backend,
        embed_dim=getattr(args, "embed_dim", PatchCoreConfig.embed_dim),
        projection_dim=getattr(args, "projection_dim", PatchCoreConfig.projection_dim) or None,  # 0: exact
        num_neighbors=getattr(args, "num_neighbors", PatchCoreConfig.num_neighbors),
        sigma=getattr(args, "sigma", PatchCoreConfig.sigma),
        map_upsample=getattr(args, "map_upsample", PatchCoreConfig.map_upsample),
        bank_dtype=getattr(args, "bank_dtype", PatchCoreConfig.bank_dtype),
        coreset_max_patches=getattr(args, "coreset_max_patches", PatchCoreConfig.coreset_max_patches) or None,
        seed=args.seed,
    )


METHOD = PatchCore
