"""SLiMe-style one-shot segmentation (Khani et al., ICLR 2024): learn class embeddings from one annotated image.

From one (or k) annotated images with K classes (0 = background), learn K token embeddings against a frozen
model's attention, then segment unseen images. Two feature sources sit behind one small interface:

* ``DenseFeatureSource``: frozen EfficientNet-Lite0 multi-scale features (offline, real weights). The "cross-
  attention" of a pixel to the class tokens is softmax_k(f̂·e_k); the frozen "self-attention" is
  softmax_j(f̂_x·f̂_j / τ). A departure from SLiMe, which has no such source: stated in the results.
* ``StableDiffusionSource``: a diffusers ``UNet2DConditionModel`` whose attention processors record the
  cross-attention of pixels to the learned text tokens and the self-attention (SLiMe's own source; needs SD
  weights on disk).

Both feed SLiMe's loss: class-weighted CE on the cross-attention scores, plus K · MSE between the
weighted-accumulated self-attention (WAS) map and the one-hot mask, plus (SD only) 0.005 · the noise loss.
A nearest-prototype baseline (mean feature per class, cosine nearest) shares the same API. Under torchrun each
process takes its slice of the support images (all of them when there are fewer than processes); the CE keeps the
whole set's normaliser.

Reading order: WAS math → feature sources (Lite0; the SD attention recorder is in ``oneshot_sd``) → config →
segmenter → CLI.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from potpourri.core.errors import PotpourriError
from potpourri.core.imaging import ImageInput, as_rgb, read_mask
from potpourri.core.io import load_bundle, save_bundle
from potpourri.core.training import Trainer, TrainOptions, autocast, check_precision, resolve_device
from potpourri.segment.features import AttentionMaps, FeatureSource

__all__ = [
    "DenseFeatureSource",
    "MultiScaleFeatures",
    "OneShotConfig",
    "OneShotSegmenter",
    "rescale_to_range",
]

FORMAT = "potpourri.oneshot"
FORMAT_VERSION = 1
METHODS = ("slime", "prototype")
SOURCES = ("efficientnet_lite0", "stable-diffusion")


def rescale_to_range(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Affinely map each (b, k) map of ``maps`` onto the [min, max] range of ``reference`` (SLiMe's inference)."""
    lo, hi = maps.amin((-2, -1), keepdim=True), maps.amax((-2, -1), keepdim=True)
    ref_lo, ref_hi = reference.amin((-2, -1), keepdim=True), reference.amax((-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo).clamp_min(1e-12) * (ref_hi - ref_lo) + ref_lo


class MultiScaleFeatures(nn.Module):
    """Taps of several EfficientNet stages, each resampled to the grid of ``grid_layer`` and concatenated.

    Example:
        features = MultiScaleFeatures(create_model("efficientnet_lite0", pretrained=True))(x)  # (B, 176, S/8, S/8)
    """

    def __init__(self, backbone: nn.Module, *, layers: Sequence[int] = (1, 2, 4), grid_layer: int = 2) -> None:
        super().__init__()
        if not all(hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks")):
            raise PotpourriError(
                f"one-shot features need an EfficientNet-style backbone, got {type(backbone).__name__}"
            )
        if not layers or min(layers) < 0 or max(layers) >= len(backbone.blocks) or grid_layer not in layers:
            raise PotpourriError(
                f"layers {list(layers)} must be block indices 0..{len(backbone.blocks) - 1} that include "
                f"grid_layer {grid_layer}"
            )
        self.layers, self.grid_layer = tuple(sorted(layers)), grid_layer
        self.stem = nn.Sequential(backbone.conv_stem, backbone.bn1)
        self.blocks = nn.ModuleList(backbone.blocks[: self.layers[-1] + 1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)  # (B, 32, S/2, S/2)
        taps = {}
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.layers:
                taps[index] = x  # (B, C_i, S/s_i, S/s_i)
        grid = taps[self.grid_layer].shape[-2:]
        resampled = [
            t if t.shape[-2:] == grid else F.interpolate(t, size=grid, mode="bilinear", antialias=t.shape[-1] > grid[1])
            for t in taps.values()
        ]
        return torch.cat(resampled, dim=1)  # (B, C, h, w)


class DenseFeatureSource(FeatureSource):
    """Frozen dense features as the attention source: cross = softmax_k(f̂·e_k), self = softmax_j(f̂_x·f̂_j / τ).

    Example:
        source = DenseFeatureSource(MultiScaleFeatures(lite0), mean=(0.5,) * 3, std=(0.5,) * 3)
    """

    name = "dense-features"

    def __init__(
        self,
        extractor: nn.Module,
        *,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        temperature: float = 0.05,
        token_scale: float = 0.01,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise PotpourriError(f"self-attention temperature must be > 0, got {temperature}")
        self.extractor = extractor
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.temperature, self.token_scale = temperature, token_scale
        self.freeze()
        with torch.no_grad():
            self.token_dim = int(self.extractor(torch.zeros(1, 3, 64, 64)).shape[1])

    @torch.no_grad()
    def prepare(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = F.normalize(self.extractor((images - self.mean) / self.std), dim=1)  # (B, C, h, w), unit norm
        flat = features.flatten(2)  # (B, C, N)
        self_attention = torch.softmax(flat.transpose(1, 2) @ flat / self.temperature, dim=-1)  # (B, N, N)
        return {"features": features, "self_attention": self_attention}

    def attend(
        self,
        prepared: dict[str, torch.Tensor],
        tokens: torch.Tensor,
        *,
        train: bool,
        generator: torch.Generator,
        rows: Sequence[int] | None = None,
    ) -> AttentionMaps:
        features, self_attention = prepared["features"], prepared["self_attention"]  # no random draws here
        if rows is not None:
            features, self_attention = features[rows], self_attention[rows]
        logits = torch.einsum("bchw,kc->bkhw", features, tokens)  # (B, K, h, w)
        return AttentionMaps(logits, logits.softmax(1), self_attention)

    def init_tokens(self, num_classes: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(num_classes, self.token_dim, generator=generator) * self.token_scale

    def features(self, prepared: dict[str, torch.Tensor]) -> torch.Tensor:
        return prepared["features"]


# ----------------------------------------------------------------------------------------------- config
@dataclass
class OneShotConfig:
    """Everything that defines a one-shot segmenter (saved in ``metadata.json``)."""

    method: str = "slime"  # or "prototype" (mean feature per class, cosine nearest)
    source: str = "efficientnet_lite0"  # or "stable-diffusion" (needs sd_weights)
    class_ids: tuple[int, ...] | None = None  # classes to learn (0 = background is always added); None = all seen
    image_size: int = 256
    layers: tuple[int, ...] = (1, 2, 4)  # Lite0 blocks: stride 4 (24 ch), 8 (40 ch), 16 (112 ch)
    grid_layer: int = 2  # every tap is resampled to this block's grid (stride 8)
    temperature: float = 0.05  # Lite0 self-attention softmax temperature on cosine similarities
    loss_size: int = 128  # CE and WAS losses are computed on masks at this size
    steps: int = 200  # SLiMe: 200 epochs of one image
    lr: float = 0.1  # SLiMe: Adam, lr 0.1
    was_loss_weight: float = 1.0  # SLiMe: 1.0 · K · MSE(WAS, one-hot)
    sd_loss_weight: float = 0.005  # SLiMe: 0.005 · SD noise loss (SD source only)
    refine: bool = True  # inference on the WAS map rescaled to the cross-attention range (SLiMe), else on cross
    sd_weights: str | None = None
    sd_resolution: int = 512
    batch_size: int = 8
    seed: int = 0


def _tuple_fields(values: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def build_source(config: OneShotConfig) -> FeatureSource:
    """The feature source a config names: offline Lite0 weights, or SD weights from ``config.sd_weights``."""
    if config.source == "efficientnet_lite0":
        from potpourri.core.registry import create_model

        backbone = create_model("efficientnet_lite0", pretrained=True)
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        return DenseFeatureSource(
            MultiScaleFeatures(backbone, layers=config.layers, grid_layer=config.grid_layer),
            mean=cfg.get("mean", (0.5,) * 3),
            std=cfg.get("std", (0.5,) * 3),
            temperature=config.temperature,
        )
    if config.source == "stable-diffusion":
        from potpourri.segment.oneshot_sd import StableDiffusionSource

        return StableDiffusionSource.from_pretrained(config.sd_weights, resolution=config.sd_resolution)
    raise PotpourriError(f"unknown one-shot source '{config.source}'; choose from {', '.join(SOURCES)}")


# ----------------------------------------------------------------------------------------------- segmenter
class _Tokens(nn.Module):
    """The learned class tokens as a module, the model that the embedding loop's ``Trainer`` steps and saves."""

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__()
        self.tokens = nn.Parameter(tokens)


class OneShotSegmenter:
    """Learn K class embeddings from k annotated images, then segment unseen ones (or a nearest-prototype baseline).

    Example:
        model = OneShotSegmenter(OneShotConfig()).fit([image], [mask]); masks = model.predict(test_images)
    """

    def __init__(self, config: OneShotConfig | None = None, *, source: FeatureSource | None = None) -> None:
        self.config = config or OneShotConfig()
        if self.config.method not in METHODS:
            raise PotpourriError(f"unknown one-shot method '{self.config.method}'; choose from {', '.join(METHODS)}")
        self._source = source
        self.class_ids: list[int] | None = None
        self.embeddings: torch.Tensor | None = None  # slime: learned tokens (n_learned, D)
        self.prototypes: torch.Tensor | None = None  # prototype: (K, C) unit vectors
        self.history: list[dict[str, float]] = []
        self.timings: dict[str, float] = {}

    @property
    def source(self) -> FeatureSource:
        if self._source is None:
            self._source = build_source(self.config)
        return self._source

    # -- inputs
    def _image_tensor(self, image: ImageInput) -> torch.Tensor:
        rgb = as_rgb(image)
        size = self.source.input_size or self.config.image_size
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, S, S)

    def source_device(self) -> torch.device:
        """Where the feature source runs (the device of its first tensor; CPU for a source without tensors)."""
        first = next(itertools.chain(self.source.parameters(), self.source.buffers()), None)
        return first.device if first is not None else torch.device("cpu")

    def place(self, device: str | None, precision: str = "fp32") -> torch.device:
        """Move the feature source to ``device`` (None: leave it where it is); check ``precision`` there."""
        if device is not None:
            self.source.to(resolve_device(device))
        where = self.source_device()
        check_precision(precision, where)
        return where

    def prepare(self, images: Sequence[ImageInput], *, precision: str = "fp32") -> dict[str, torch.Tensor]:
        """The source's frozen per-image state (features, self-attention or latents), computed in batches on the
        source's device (``precision``: autocast of its forward passes; the state is kept in fp32)."""
        where = self.source_device()
        parts = []
        for first in range(0, len(images), self.config.batch_size):
            batch = torch.stack([self._image_tensor(i) for i in images[first : first + self.config.batch_size]])
            with autocast(where, precision):
                prepared = self.source.prepare(batch.to(where))
            parts.append({k: v.float() if v.is_floating_point() else v for k, v in prepared.items()})
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _class_table(self, masks: list[np.ndarray]) -> list[int]:
        seen = sorted(set().union(*(np.unique(m).tolist() for m in masks)) | {0})
        if self.config.class_ids is None:
            ids = seen
        else:
            ids = sorted(set(self.config.class_ids) | {0})
            absent = sorted(set(ids) - set(seen))
            if absent:
                raise PotpourriError(
                    f"class ids {absent} are absent from the support masks; annotate them or drop them from class_ids"
                )
            extra = sorted(set(seen) - set(ids))
            if extra:
                raise PotpourriError(
                    f"support masks hold class ids {extra} not in class_ids {ids}; add them or relabel"
                )
        if len(ids) < 2:
            raise PotpourriError("the support masks hold only background (0); annotate at least one class")
        return ids

    # -- fit
    def fit(
        self,
        images: Sequence[ImageInput],
        masks: Sequence[Any],
        *,
        options: TrainOptions | None = None,
        checkpoints: str | os.PathLike | None = None,
    ) -> OneShotSegmenter:
        """Learn from k annotated images (masks: class ids per pixel, 0 = background); the loss pools all k.

        ``options``: device, precision, resume of the embedding loop (the source runs on that device too);
        ``checkpoints``: its checkpoint folder (None: no checkpoints)."""
        options = options or TrainOptions()
        images, masks = list(images), [read_mask(m) for m in masks]
        if not images:
            raise PotpourriError("one-shot fit got no support images")
        if len(images) != len(masks):
            raise PotpourriError(f"{len(images)} support images but {len(masks)} masks; give one mask per image")
        for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
            height, width = as_rgb(image).size[::-1]
            if mask.shape != (height, width):
                raise PotpourriError(
                    f"support mask {index} is {mask.shape[1]}x{mask.shape[0]} but its image is {width}x{height}; "
                    "masks must match their image pixel for pixel"
                )
        self.class_ids = self._class_table(masks)
        lookup = np.zeros(max(self.class_ids) + 1, dtype=np.int64)
        lookup[self.class_ids] = np.arange(len(self.class_ids))
        size = self.config.loss_size
        nearest = Image.Resampling.NEAREST
        targets = torch.stack(
            [
                torch.from_numpy(np.array(Image.fromarray(lookup[m].astype(np.uint8)).resize((size, size), nearest)))
                for m in masks
            ]
        ).long()  # (k, L, L) class indices 0..K-1
        lost = [c for i, c in enumerate(self.class_ids) if not (targets == i).any()]
        if lost:
            raise PotpourriError(f"class ids {lost} vanish when masks are resized to loss_size={size}; raise loss_size")
        start = time.perf_counter()
        where = self.place(options.device, options.precision)
        prepared = self.prepare(images, precision=options.precision)
        targets = targets.to(where)
        self.timings["prepare_s"] = time.perf_counter() - start
        start = time.perf_counter()
        if self.config.method == "prototype":
            self._fit_prototypes(prepared, targets)
        else:
            self._fit_embeddings(prepared, targets, options, checkpoints)
        self.timings["fit_s"] = time.perf_counter() - start
        return self

    def _fit_prototypes(self, prepared: dict[str, torch.Tensor], targets: torch.Tensor) -> None:
        size = self.config.loss_size
        features = F.interpolate(self.source.features(prepared), size=(size, size), mode="bilinear")  # (k, C, L, L)
        flat, labels = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]), targets.reshape(-1)
        sums = torch.zeros(len(self.class_ids), flat.shape[1], device=flat.device).index_add_(0, labels, flat)  # (K, C)
        counts = torch.bincount(labels, minlength=len(self.class_ids))[:, None]
        self.prototypes = F.normalize(sums / counts, dim=1).cpu()

    def _class_weights(self, targets: torch.Tensor) -> torch.Tensor:
        """SLiMe's CE weights: foreground pixel total / class pixel count; background 1; absent classes 0."""
        counts = torch.bincount(targets.reshape(-1), minlength=len(self.class_ids)).float()
        counts[0] = 0
        weights = torch.where(counts > 0, counts.sum() / counts.clamp_min(1), torch.zeros((), device=counts.device))
        weights[0] = 1.0
        return weights

    def loss(
        self,
        maps: AttentionMaps,
        targets: torch.Tensor,
        weights: torch.Tensor,
        one_hot: torch.Tensor | None = None,
        *,
        share: float = 1.0,
        ce_normaliser: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """SLiMe's loss on (k, L, L) class-index targets: CE + w · K · MSE(WAS, one-hot) + w_sd · noise loss.

        For one process's slice of a batch (torchrun): ``share`` scales the means, ``ce_normaliser`` divides the
        weighted CE sum instead of the slice's own weight total (the global total over the process count)."""
        size, k = targets.shape[-2:], len(self.class_ids)
        logits = F.interpolate(maps.cross_logits, size=size, mode="bilinear")  # (B, K, L, L)
        if ce_normaliser is None:
            ce = F.cross_entropy(logits, targets, weight=weights)
        else:  # a weighted mean's normaliser counts the whole batch: Σ weights[targets], not the slice's
            ce = F.cross_entropy(logits, targets, weight=weights, reduction="sum") / ce_normaliser
        was = F.interpolate(maps.accumulated, size=size, mode="bilinear")  # (B, K, L, L)
        if one_hot is None:
            one_hot = F.one_hot(targets, k).permute(0, 3, 1, 2).float()
        was_loss = F.mse_loss(was, one_hot) * k * share
        total = ce + self.config.was_loss_weight * was_loss
        parts = {"ce": ce, "was": was_loss}
        if maps.aux_loss is not None:
            aux = maps.aux_loss * share
            total = total + self.config.sd_loss_weight * aux
            parts["sd"] = aux
        return {"loss": total, **parts}

    def _fit_embeddings(
        self,
        prepared: dict[str, torch.Tensor],
        targets: torch.Tensor,
        options: TrainOptions,
        checkpoints: str | os.PathLike | None,
    ) -> None:
        generator = torch.Generator().manual_seed(self.config.seed)
        tokens = _Tokens(self.source.init_tokens(len(self.class_ids), generator))
        optimizer = torch.optim.Adam([tokens.tokens], lr=self.config.lr)
        trainer = Trainer(
            tokens, optimizer, total_steps=self.config.steps, options=options, folder=checkpoints,
            generators={"noise": generator}, desc="one-shot embeddings",
        )  # fmt: skip
        weights = self._class_weights(targets)
        one_hot = F.one_hot(targets, len(self.class_ids)).permute(0, 3, 1, 2).float()  # (k, K, L, L)
        history = trainer.state.setdefault("history", [])  # checkpointed with the tokens
        world = trainer.group.world
        # under torchrun each process takes its slice of the k images (all of them in every process when k < world)
        rows, share, ce_normaliser = None, 1.0, None
        if trainer.group.distributed and len(targets) >= world:
            rows, share = trainer.shard(list(range(len(targets))))
            ce_normaliser = weights[targets].sum() / world  # the whole batch's Σ weights[targets] over the processes
            targets, one_hot = targets[rows], one_hot[rows]
        for _ in trainer.steps():
            with trainer.autocast():
                maps = self.source.attend(prepared, tokens.tokens, train=True, generator=generator, rows=rows)
                parts = self.loss(maps, targets, weights, one_hot, share=share, ce_normaliser=ce_normaliser)
            # before update() may checkpoint; under torchrun each part is the global batch's (the mean of the shares)
            values = trainer.sums_over_processes({k: float(v.detach()) for k, v in parts.items()})
            history.append({k: v / world for k, v in values.items()})
            trainer.update(parts["loss"])
        trainer.finish()
        self.history = list(history)
        self.embeddings = tokens.tokens.detach().cpu().clone()

    # -- predict
    def _require_fit(self) -> None:
        fitted = self.prototypes if self.config.method == "prototype" else self.embeddings
        if fitted is None or self.class_ids is None:
            raise PotpourriError("the one-shot segmenter is not fitted: call fit(images, masks) or load a saved one")

    @torch.no_grad()
    def scores(
        self, images: Sequence[ImageInput], *, device: str | None = None, precision: str = "fp32"
    ) -> torch.Tensor:
        """Per-class scores (N, K, S, S) at the configured image size (on the CPU); argmax over K gives the class
        index. ``device`` (None: where the source is) and ``precision`` say where and how the source runs."""
        self._require_fit()
        images = list(images)
        if not images:
            raise PotpourriError("one-shot predict got no images")
        self.place(device, precision)
        step = self.config.batch_size
        return torch.cat(
            [
                self.scores_prepared(self.prepare(images[i : i + step], precision=precision), precision=precision)
                for i in range(0, len(images), step)
            ]
        )

    @torch.no_grad()
    def scores_prepared(self, prepared: dict[str, torch.Tensor], *, precision: str = "fp32") -> torch.Tensor:
        """``scores`` for images already run through ``prepare`` (reuse them across models of one source)."""
        self._require_fit()
        where = self.source_device()
        with autocast(where, precision):
            if self.config.method == "prototype":
                features = self.source.features(prepared)  # (B, C, h, w)
                prototypes = self.prototypes.to(where)
                maps = torch.einsum("bchw,kc->bkhw", F.normalize(features, dim=1), prototypes)
            else:
                generator = torch.Generator().manual_seed(self.config.seed)
                attention = self.source.attend(prepared, self.embeddings.to(where), train=False, generator=generator)
                maps = attention.cross
                if self.config.refine:
                    maps = rescale_to_range(attention.accumulated, attention.cross)
        size = self.config.image_size
        return F.interpolate(maps.float(), size=(size, size), mode="bilinear").cpu()  # (B, K, S, S)

    def labels(self, scores: torch.Tensor) -> np.ndarray:
        """Class-id masks (N, S, S) uint8 from ``scores``, in the support masks' own ids."""
        return np.asarray(self.class_ids, dtype=np.uint8)[scores.argmax(1).numpy()]

    def predict(
        self, images: Sequence[ImageInput], *, device: str | None = None, precision: str = "fp32"
    ) -> np.ndarray:
        """Class-id masks (N, S, S) uint8 at the configured image size, in the support masks' own ids."""
        return self.labels(self.scores(images, device=device, precision=precision))

    # -- save / load
    def metadata(self) -> dict[str, Any]:
        from potpourri.core.version import __version__

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "potpourri_version": __version__,
            "config": dataclasses.asdict(self.config),
            "class_ids": self.class_ids,
            "timings": self.timings,
            "final_loss": self.history[-1] if self.history else None,
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``oneshot.safetensors`` (embeddings or prototypes) and ``metadata.json``, each atomically."""
        self._require_fit()
        folder = Path(folder)
        name = "prototypes" if self.config.method == "prototype" else "embeddings"
        tensors = {name: getattr(self, name), "class_ids": torch.tensor(self.class_ids, dtype=torch.int64)}
        save_bundle(
            folder / "oneshot.safetensors",
            tensors,
            folder / "metadata.json",
            self.metadata(),
            tensor_metadata={"method": self.config.method},
        )
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, *, source: FeatureSource | None = None) -> OneShotSegmenter:
        """Load a saved segmenter; ``source`` reuses an already built feature source."""
        folder = Path(folder)
        metadata, tensors = load_bundle(
            folder / "oneshot.safetensors",
            folder / "metadata.json",
            missing=f"'{folder}' holds no one-shot model (no metadata.json); fit one first",
            fix="refit the model with this potpourri",
            format=FORMAT,
            format_version=FORMAT_VERSION,
        )
        known = {f.name for f in dataclasses.fields(OneShotConfig)}
        unknown = sorted(set(metadata["config"]) - known)
        if unknown:
            raise PotpourriError(f"'{folder}' has config keys {unknown} unknown to this potpourri; refit the model")
        model = cls(OneShotConfig(**_tuple_fields(metadata["config"])), source=source)
        model.class_ids = [int(i) for i in tensors["class_ids"]]
        if model.config.method == "prototype":
            model.prototypes = tensors["prototypes"]
        else:
            model.embeddings = tensors["embeddings"]
        model.timings = metadata.get("timings", {})
        return model


# ----------------------------------------------------------------------------------------------- CLI
