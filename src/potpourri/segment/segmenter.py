"""Fine-grained multi-class defect segmentation (Defect Spectrum's task): EfficientNet-Lite0 encoder + UNet decoder.

Reading order: input checks → encoder (stem and the first stages of a timm EfficientNet, tapped at strides 2, 4, 8,
16) → light UNet decoder with a full-resolution image skip → ``SegmenterConfig`` → ``Segmenter`` (train, predict,
save/load, latency) → ``train_segmenter``. The encoder is ``frozen`` (ImageNet weights untouched), ``partial`` (the
block-map entries of ``tune_blocks`` train, as in the tuning engine's SubTuning) or ``full``; its BatchNorm layers
always use their running statistics, since batches of a few images are too small for batch statistics.
Under torchrun each process trains on its slice of every batch (``Trainer.shard``; ``TrainOptions.sync_bn`` gives the
decoder's BatchNorm the global batch's statistics); the split is exact for an unweighted cross-entropy without dice
(``class_weight_power=0, dice_weight=0``), whereas class weights and dice are ratios taken over each slice.

Example:
    seg = train_segmenter(images, masks, SegmenterConfig(image_size=96, encoder="full"))  # (N,H,W,3), (N,H,W)
    pred = seg.predict(test_images)                                                          # (N, H, W) class ids
    seg.save("runs/seg/v0"); seg = Segmenter.load("runs/seg/v0")
"""

from __future__ import annotations

import dataclasses
import math
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
from potpourri.core.imaging import ImageInput, as_rgb
from potpourri.core.io import load_bundle, save_bundle
from potpourri.core.metrics import iou_per_class, mean_iou
from potpourri.core.results import InspectionResult
from potpourri.core.training import Trainer, TrainOptions, autocast, check_precision, resolve_device
from potpourri.data.synth import CLASSES
from potpourri.models.layers import soft_dice

__all__ = [
    "ENCODER_POLICIES",
    "Segmenter",
    "SegmenterConfig",
    "SegmenterNet",
    "UNetDecoder",
    "check_images",
    "check_masks",
    "colour_mask",
    "evaluate_segmentation",
    "segmentation_panels_png",
    "train_segmenter",
]

ENCODER_POLICIES = ("frozen", "partial", "full")
FORMAT = "potpourri.segmenter"
FORMAT_VERSION = 1
CONFIG_FILE = "segmenter.json"
TENSORS_FILE = "segmenter.safetensors"


# ----------------------------------------------------------------------------------------------- input checks
def check_images(images: np.ndarray, what: str = "images") -> np.ndarray:
    """Check a (N, H, W, 3) uint8 batch; wrong rank, dtype or channel count raises one line with the fix."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise PotpourriError(f"{what} must be an (N, H, W, 3) array, got shape {images.shape}")
    if images.shape[-1] != 3:
        raise PotpourriError(
            f"{what} have {images.shape[-1]} channels (shape {images.shape}); convert them to 3-channel RGB first "
            "(grey: repeat the channel; RGBA: flatten the alpha)"
        )
    if images.dtype != np.uint8:
        raise PotpourriError(f"{what} must be uint8 (0-255), got {images.dtype}; convert with .astype(np.uint8)")
    if not len(images):
        raise PotpourriError(f"no {what} given")
    return images


def check_masks(masks: np.ndarray, images: np.ndarray, num_classes: int, class_names: Sequence[str] = ()) -> np.ndarray:
    """Check (N, H, W) integer class-id masks against their images; returns them as int64."""
    masks = np.asarray(masks)
    if not np.issubdtype(masks.dtype, np.integer):
        raise PotpourriError(f"masks must hold integer class ids, got dtype {masks.dtype}")
    if masks.shape != images.shape[:3]:
        raise PotpourriError(
            f"masks have shape {masks.shape} but the images are {images.shape[:3]} (N, H, W); "
            "give one class-id mask per image at the image's size (resize masks with nearest neighbour)"
        )
    unknown = np.setdiff1d(np.unique(masks), np.arange(num_classes))
    if unknown.size:
        names = f" ({', '.join(f'{i}={n}' for i, n in enumerate(class_names))})" if class_names else ""
        raise PotpourriError(
            f"masks hold unknown class ids {unknown[:5].tolist()}; expected 0..{num_classes - 1}{names}: "
            "fix the mask encoding or pass the right class list"
        )
    return masks.astype(np.int64)


# ----------------------------------------------------------------------------------------------- network
def _conv_bn_relu(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class Encoder(nn.Module):
    """The stem and first stages of a timm EfficientNet, returning the outputs of the tapped stages.

    Parameter names stay those of the backbone (``conv_stem``, ``bn1``, ``blocks.i.j``), so the tuning engine's
    block map names the same blocks.
    """

    def __init__(self, backbone: nn.Module, taps: Sequence[int]) -> None:
        super().__init__()
        if not all(hasattr(backbone, a) for a in ("conv_stem", "bn1", "blocks")):
            raise PotpourriError(f"the segmenter needs an EfficientNet-style backbone, got {type(backbone).__name__}")
        if not taps or min(taps) < 0 or max(taps) >= len(backbone.blocks) or list(taps) != sorted(set(taps)):
            raise PotpourriError(f"taps {list(taps)} must be increasing stage indices 0..{len(backbone.blocks) - 1}")
        self.taps = tuple(taps)
        self.conv_stem, self.bn1 = backbone.conv_stem, backbone.bn1
        self.blocks = nn.Sequential(*backbone.blocks[: self.taps[-1] + 1])  # later stages are never run
        with torch.no_grad():
            shapes = [f.shape for f in self(torch.zeros(1, 3, 64, 64))]
        self.channels = [s[1] for s in shapes]
        self.strides = [64 // s[-1] for s in shapes]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.bn1(self.conv_stem(x))  # (B, 32, H/2, W/2)
        features = []
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in self.taps:
                features.append(x)  # (B, C_i, H/s_i, W/s_i)
        return features


class UNetDecoder(nn.Module):
    """UNet decoder: from the deepest tap up, upsample ×2, concatenate the next skip, two 3×3 conv-BN-ReLU."""

    def __init__(self, channels: Sequence[int], width: int) -> None:
        super().__init__()
        deep = list(channels)[::-1]  # deepest first
        self.project = _conv_bn_relu(deep[0], width, 1)
        self.stages = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(width + skip, width), _conv_bn_relu(width, width)) for skip in deep[1:]
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.project(features[-1])  # (B, W, H/s_max, W/s_max)
        for stage, skip in zip(self.stages, features[-2::-1], strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, skip], dim=1))  # (B, W, h_skip, w_skip)
        return x  # (B, W, H/s_min, W/s_min)


class SegmenterNet(nn.Module):
    """Encoder → UNet decoder → (optional) full-resolution image skip → 1×1 classifier; logits (B, K, H, W)."""

    def __init__(self, encoder: Encoder, num_classes: int, *, width: int = 32, image_skip: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = UNetDecoder(encoder.channels, width)
        # thin defects (1-px scratches) vanish at stride 2: a shallow full-resolution branch sees them
        self.image_skip = _conv_bn_relu(3, width // 2) if image_skip else None
        self.refine = _conv_bn_relu(width + (width // 2 if image_skip else 0), width)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)  # list of (B, C_i, H/s_i, W/s_i)
        y = F.interpolate(self.decoder(features), size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.image_skip is not None:
            y = torch.cat([y, self.image_skip(x)], dim=1)  # (B, W + W/2, H, W)
        return self.classifier(self.refine(y))  # (B, K, H, W)


# ----------------------------------------------------------------------------------------------- config
@dataclass
class SegmenterConfig:
    """Everything that defines a segmenter and its training (saved in ``segmenter.json``)."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    class_names: tuple[str, ...] = CLASSES  # index 0 is background
    image_size: int = 96
    taps: tuple[int, ...] = (0, 1, 2, 4)  # stages at strides 2, 4, 8, 16 (16, 24, 40, 112 channels)
    decoder_width: int = 32
    image_skip: bool = True
    encoder: str = "frozen"  # frozen | partial | full
    tune_blocks: tuple[str, ...] = ()  # partial: block-map entries that train (default: the deepest tapped stage)
    steps: int = 400  # optimizer steps; the same budget whatever the training-set size
    batch_size: int = 8
    lr: float = 2e-3  # decoder and head
    encoder_lr: float = 2e-4  # trained encoder blocks (partial, full)
    weight_decay: float = 1e-4
    dice_weight: float = 0.5  # loss = CE + dice_weight * soft multi-class dice (0 = CE only)
    class_weight_power: float = 0.5  # CE weight ∝ frequency^-power over the training masks (0 = unweighted)
    augment: bool = True  # random flips and 90° turns of image and mask together
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def check(self) -> None:
        """Raise one line for an invalid setting."""
        if self.encoder not in ENCODER_POLICIES:
            raise PotpourriError(f"unknown encoder policy '{self.encoder}'; choose {', '.join(ENCODER_POLICIES)}")
        if self.num_classes < 2:
            raise PotpourriError(f"need background and at least one defect class, got {list(self.class_names)}")
        if self.image_size < 32 or self.image_size % 16:
            raise PotpourriError(f"image_size {self.image_size} must be a multiple of 16, at least 32")
        if self.steps < 1 or self.batch_size < 1:
            raise PotpourriError(f"steps ({self.steps}) and batch_size ({self.batch_size}) must be positive")


def _pixel_stats(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.5,) * 3)), tuple(cfg.get("std", (0.5,) * 3))


def _soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice of softmax(logits) against one-hot targets (whole batch)."""
    probs = logits.softmax(1)  # (B, K, H, W)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)  # (B, K, H, W)
    return 1 - soft_dice(probs, onehot, (0, 2, 3), eps).mean()


def _class_weights(masks: np.ndarray, num_classes: int, power: float) -> torch.Tensor | None:
    """CE weights ∝ frequency^-power (absent classes 1), scaled so the average pixel weight is 1."""
    if power == 0:
        return None
    counts = np.bincount(masks.ravel(), minlength=num_classes).astype(np.float64)
    freq = counts / counts.sum()
    weights = np.where(counts > 0, np.power(np.maximum(freq, 1e-12), -power), 1.0)
    weights /= (freq * weights).sum()
    return torch.tensor(weights, dtype=torch.float32)


def _augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Per-sample random horizontal/vertical flips and quarter turns, the same for image and mask."""
    out_images, out_masks = [], []
    for image, mask in zip(images, masks, strict=True):  # (3, S, S), (S, S)
        flips = torch.randint(0, 2, (2,), generator=generator).tolist()
        turns = int(torch.randint(0, 4, (1,), generator=generator))
        dims = [d for d, f in zip((-1, -2), flips, strict=True) if f]
        if dims:
            image, mask = image.flip(dims), mask.flip(dims)
        if turns:
            image, mask = image.rot90(turns, (-2, -1)), mask.rot90(turns, (-2, -1))
        out_images.append(image)
        out_masks.append(mask)
    return torch.stack(out_images), torch.stack(out_masks)


# ----------------------------------------------------------------------------------------------- the method
class Segmenter:
    """A multi-class defect segmenter: ``fit(images, masks)``, ``predict(images) -> class ids``, save/load.

    Example:
        seg = Segmenter(SegmenterConfig(encoder="full", steps=300)).fit(images, masks); pred = seg.predict(x)
    """

    def __init__(self, config: SegmenterConfig | None = None, *, backbone: nn.Module | None = None) -> None:
        self.config = config or SegmenterConfig()
        self.config.check()
        self._backbone = backbone
        self._net: SegmenterNet | None = None
        self.history: list[dict[str, float]] = []
        self.notes: list[str] = []
        self.metrics: dict[str, Any] = {}
        self.fitted = False

    # -- model ------------------------------------------------------------------------------------------------
    @property
    def net(self) -> SegmenterNet:
        if self._net is None:
            from potpourri.core.registry import create_model

            backbone = self._backbone or create_model(self.config.backbone, pretrained=self.config.pretrained)
            self._mean_std = _pixel_stats(backbone)
            encoder = Encoder(backbone, self.config.taps)
            with torch.random.fork_rng(devices=[]):  # the decoder's initialisation is part of the seeded run
                torch.manual_seed(self.config.seed)
                self._net = SegmenterNet(
                    encoder, self.config.num_classes, width=self.config.decoder_width, image_skip=self.config.image_skip
                )
            self._apply_encoder_policy()
        return self._net

    def encoder_block_map(self) -> dict[str, list[str]]:
        """The tuning engine's block map restricted to the encoder that is run: 'stem', 'blocks.0.0', …"""
        from potpourri.models.blocks import entry_of

        encoder = self.net.encoder
        bmap: dict[str, list[str]] = {"stem": ["conv_stem", "bn1"]}
        for stage_index, stage in enumerate(encoder.blocks):
            for block_index, _ in enumerate(stage):
                bmap[f"blocks.{stage_index}.{block_index}"] = [f"blocks.{stage_index}.{block_index}"]
        orphans = [n for n, _ in encoder.named_parameters() if entry_of(n, bmap) is None]
        if orphans:
            raise PotpourriError(f"encoder parameter '{orphans[0]}' is in no block-map entry")
        return bmap

    def _trained_blocks(self) -> list[str]:
        from potpourri.models.blocks import check_blocks

        bmap = self.encoder_block_map()
        if self.config.encoder == "full":
            return list(bmap)
        if self.config.encoder == "frozen":
            return []
        blocks = list(self.config.tune_blocks) or [b for b in bmap if b.startswith(f"blocks.{self.config.taps[-1]}.")]
        check_blocks(blocks, bmap)
        return blocks

    def _apply_encoder_policy(self) -> None:
        from potpourri.models.blocks import entry_of

        assert self._net is not None
        bmap, trained = self.encoder_block_map(), set(self._trained_blocks())
        for name, param in self._net.encoder.named_parameters():
            param.requires_grad_(entry_of(name, bmap) in trained)

    def trainable_parameters(self) -> dict[str, int]:
        """Trainable parameter counts of the encoder and of the decoder + head."""
        enc = sum(p.numel() for p in self.net.encoder.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.net.parameters() if p.requires_grad)
        rest = total - enc
        return {"encoder": enc, "decoder": rest}

    def _train_mode(self) -> None:
        self.net.train()
        for module in self.net.encoder.modules():  # running ImageNet statistics: batches are too small
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        if self.config.encoder == "frozen":
            self.net.encoder.eval()

    # -- data -------------------------------------------------------------------------------------------------
    def _normalise(self, images: np.ndarray) -> torch.Tensor:
        """(N, S, S, 3) uint8 → (N, 3, S, S) float, with the backbone's mean and std."""
        self.net  # noqa: B018  (sets the mean/std of the backbone)
        x = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2) / 255.0  # astype: a writable copy
        mean, std = self._mean_std
        return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    def _resize_images(self, images: np.ndarray) -> np.ndarray:
        size = self.config.image_size
        if images.shape[1:3] == (size, size):
            return images
        return np.stack([np.asarray(Image.fromarray(i).resize((size, size), Image.Resampling.BICUBIC)) for i in images])

    def _resize_masks(self, masks: np.ndarray) -> np.ndarray:
        size = self.config.image_size
        if masks.shape[1:3] == (size, size):
            return masks
        nearest = Image.Resampling.NEAREST
        return np.stack(
            [np.asarray(Image.fromarray(m.astype(np.uint8)).resize((size, size), nearest)) for m in masks]
        ).astype(np.int64)

    def _as_array(self, images: np.ndarray | Sequence[ImageInput]) -> np.ndarray:
        if isinstance(images, np.ndarray):
            return check_images(images)
        arrays = [np.asarray(as_rgb(i)) for i in images]
        if not arrays:
            raise PotpourriError("no images given")
        if len({a.shape for a in arrays}) > 1:
            raise PotpourriError(
                f"images differ in size ({sorted({a.shape[:2] for a in arrays})[:3]}); predict them one at a time"
            )
        return np.stack(arrays)

    # -- training ---------------------------------------------------------------------------------------------
    def fit(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        *,
        progress: bool = True,
        log_every: int = 50,
        options: TrainOptions | None = None,
        checkpoints: str | os.PathLike | None = None,
    ) -> Segmenter:
        """Train on (N, H, W, 3) uint8 images and (N, H, W) class-id masks for ``config.steps`` AdamW steps.

        ``options`` picks device, precision and resume (default: ``TrainOptions(progress=progress)``);
        ``checkpoints`` is the folder of resumable checkpoints (None: none are written)."""
        cfg = self.config
        images = check_images(images)
        masks = check_masks(masks, images, cfg.num_classes, cfg.class_names)
        if images.shape[1:3] != (cfg.image_size, cfg.image_size):
            self.notes.append(f"training images resized from {images.shape[2]}x{images.shape[1]} to {cfg.image_size}")
        images, masks = self._resize_images(images), self._resize_masks(masks)
        x, y = self._normalise(images), torch.from_numpy(masks)
        net = self.net
        decoder_params = [p for n, p in net.named_parameters() if not n.startswith("encoder.")]
        groups = [{"params": decoder_params, "lr": cfg.lr}]
        encoder_params = [p for p in net.encoder.parameters() if p.requires_grad]
        if encoder_params:
            groups.append({"params": encoder_params, "lr": cfg.encoder_lr})
        optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))
        )
        weights = _class_weights(masks, cfg.num_classes, cfg.class_weight_power)
        generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # before the trainer: a resumed run restores the global RNG over it
        start = time.perf_counter()
        trainer = Trainer(
            net, optimizer, total_steps=cfg.steps, options=options or TrainOptions(progress=progress),
            folder=checkpoints, schedulers={"lr": schedule}, generators={"batches": generator}, desc="segmenter",
        )  # fmt: skip
        # the loop's own state, checkpointed: the shuffled indices left of this epoch, the running loss, the log
        state = trainer.state
        state.setdefault("order", [])
        state.setdefault("running", 0.0)
        state.setdefault("history", [])
        weights = weights.to(trainer.device) if weights is not None else None
        self._train_mode()
        for step in trainer.steps():
            order = state["order"]
            if len(order) < cfg.batch_size:  # epoch-wise shuffling; a batch may span two epochs
                order += torch.randperm(len(x), generator=generator).tolist()
            batch, state["order"] = order[: cfg.batch_size], order[cfg.batch_size :]
            xb, yb = x[batch], y[batch]
            if cfg.augment:  # the global batch on every process (one generator state), then this process's slice
                xb, yb = _augment(xb, yb, generator)
            local, share = trainer.shard(list(range(len(batch))))  # under torchrun: batch[rank::world]
            xb, yb = xb[local].to(trainer.device), yb[local].to(trainer.device)
            with trainer.autocast():
                logits = net(xb)  # (B, K, S, S)
                loss = F.cross_entropy(logits, yb, weight=weights)
                if cfg.dice_weight:
                    loss = loss + cfg.dice_weight * _soft_dice_loss(logits.float(), yb)
                loss = loss * share
            # the loop's state first (update() may checkpoint); the global batch's loss under torchrun
            state["running"] += trainer.mean_over_processes(loss.detach().float().item())
            if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
                count = (step % log_every) + 1
                mean = state["running"] / count
                state["history"].append({"step": step + 1, "loss": mean, "s": time.perf_counter() - start})
                state["running"] = 0.0
            trainer.update(loss)
        trainer.finish()
        net.eval()
        self.history.extend(state["history"])
        self.fitted = True
        self.metrics["train_s"] = time.perf_counter() - start
        return self

    # -- inference --------------------------------------------------------------------------------------------
    def _place(self, device: str | None, precision: str) -> torch.device:
        """Move the net to ``device`` (None: leave it where it is) and check ``precision`` there."""
        net = self.net
        if device is not None:
            net.to(resolve_device(device))
        where = next(net.parameters()).device
        check_precision(precision, where)
        return where

    @torch.inference_mode()
    def predict_proba(
        self,
        images: np.ndarray | Sequence[ImageInput],
        *,
        batch_size: int = 16,
        device: str | None = None,
        precision: str = "fp32",
    ) -> np.ndarray:
        """Class probabilities (N, K, H, W) float32 at the images' own size; ``device`` (auto, cpu, cuda, cuda:N;
        None: where the net is) and ``precision`` (fp32, bf16, fp16) say where and how the net runs."""
        images = self._as_array(images)
        height, width = images.shape[1:3]
        x = self._normalise(self._resize_images(images))
        where = self._place(device, precision)
        net = self.net.eval()
        out = []
        for first in range(0, len(x), batch_size):
            with autocast(where, precision):
                logits = net(x[first : first + batch_size].to(where))  # (B, K, S, S)
            logits = logits.float()
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            out.append(logits.softmax(1).cpu())
        return torch.cat(out).numpy()

    def predict(
        self,
        images: np.ndarray | Sequence[ImageInput],
        *,
        batch_size: int = 16,
        device: str | None = None,
        precision: str = "fp32",
    ) -> np.ndarray:
        """Class-id masks (N, H, W) int64 at the images' own size (argmax of ``predict_proba``)."""
        probs = self.predict_proba(images, batch_size=batch_size, device=device, precision=precision)
        return probs.argmax(1).astype(np.int64)

    def inspection_results(self, images: np.ndarray | Sequence[ImageInput]) -> list[InspectionResult]:
        """The common inspection contract: map = 1 − p(background), mask = predicted defect, score = max of map."""
        probs = self.predict_proba(images)
        results = []
        for p in probs:
            anomaly = (1.0 - p[0]).astype(np.float32)
            defect = p.argmax(0) > 0
            results.append(InspectionResult(float(anomaly.max()), anomaly, defect, bool(defect.any())))
        return results

    def evaluate(
        self, images: np.ndarray, masks: np.ndarray, *, device: str | None = None, precision: str = "fp32"
    ) -> dict[str, Any]:
        """Per-class IoU and mIoU (with and without background) on a labelled set."""
        images = check_images(images)
        masks = check_masks(masks, images, self.config.num_classes, self.config.class_names)
        predicted = self.predict(images, device=device, precision=precision)
        return evaluate_segmentation(predicted, masks, self.config.class_names)

    @torch.inference_mode()
    def latency_ms(self, *, batch: int = 1, threads: int = 1, rounds: int = 10) -> dict[str, float]:
        """CPU latency per image at ``image_size`` (median over interleaved rounds, pinned threads); a net trained on
        a GPU is moved to the CPU first."""
        from potpourri.core.timing import interleaved_timings

        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            net = self.net.eval().cpu()
            x = torch.randn(batch, 3, self.config.image_size, self.config.image_size)
            seconds = interleaved_timings({"net": lambda: net(x)}, warmup=2, rounds=rounds)["net"]
        finally:
            torch.set_num_threads(previous)
        median = float(np.median(seconds))
        return {"ms_per_image": 1000 * median / batch, "batch": batch, "threads": threads, "image_size": x.shape[-1]}

    # -- files ------------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``segmenter.safetensors`` (all weights) and ``segmenter.json`` (config, notes, metrics)."""
        if not self.fitted:
            raise PotpourriError("the segmenter is not trained: call fit(images, masks) before save")
        from potpourri.core.version import __version__

        folder = Path(folder)
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "potpourri_version": __version__,
            "config": dataclasses.asdict(self.config),
            "notes": self.notes,
            "metrics": self.metrics,
            "history": self.history,
        }
        tensors = {k: v.detach().cpu() for k, v in self.net.state_dict().items()}
        save_bundle(folder / TENSORS_FILE, tensors, folder / CONFIG_FILE, meta, tensor_metadata={"format": FORMAT})
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Segmenter:
        """Load a saved segmenter; the encoder architecture is rebuilt without downloading any weights."""
        folder = Path(folder)
        missing = (
            f"'{folder}' is not a segmenter run (no {CONFIG_FILE}); train one with "
            "`potpourri inspect segment-train --data ... --out DIR`"
        )
        fix = "retrain the segmenter with this potpourri"
        meta, state = load_bundle(
            folder / TENSORS_FILE,
            folder / CONFIG_FILE,
            missing=missing,
            fix=fix,
            format=FORMAT,
            format_version=FORMAT_VERSION,
        )
        known = {f.name for f in dataclasses.fields(SegmenterConfig)}
        unknown = sorted(set(meta["config"]) - known)
        if unknown:
            raise PotpourriError(f"'{folder}' has config keys {unknown} unknown to this potpourri; retrain")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
        config = SegmenterConfig(**{**values, "pretrained": False})  # the saved tensors hold every weight
        from potpourri.core.registry import create_model

        seg = cls(config, backbone=create_model(config.backbone, pretrained=False))
        missing, unexpected = seg.net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise PotpourriError(
                f"'{folder / TENSORS_FILE}' does not fit this segmenter ({len(missing)} missing, {len(unexpected)} "
                f"unexpected keys, first: {(list(missing) + list(unexpected))[0]}); retrain"
            )
        seg.config = dataclasses.replace(config, pretrained=bool(meta["config"].get("pretrained", True)))
        seg.notes, seg.metrics = list(meta.get("notes", [])), dict(meta.get("metrics", {}))
        seg.history = list(meta.get("history", []))
        seg.net.eval()
        seg.fitted = True
        return seg


def colour_mask(mask: np.ndarray) -> np.ndarray:
    """Class ids (H, W) as Defect Spectrum palette colours (H, W, 3) uint8 (ids above 10 wrap around)."""
    from potpourri.data.synth import PALETTE

    return np.asarray(PALETTE, np.uint8)[np.asarray(mask) % len(PALETTE)]


def segmentation_panels_png(
    images: np.ndarray,
    predictions: np.ndarray,
    path: str | os.PathLike,
    *,
    truth: np.ndarray | None = None,
    captions: Sequence[str] | None = None,
) -> Path:
    """One row per image: image | ground truth (if given) | prediction, masks in the palette colours."""
    from potpourri.report.plots import image_grid_png

    tiles, labels = [], []
    for index, (image, pred) in enumerate(zip(images, predictions, strict=True)):
        name = captions[index] if captions else f"image {index}"
        tiles += [image, *([colour_mask(truth[index])] if truth is not None else []), colour_mask(pred)]
        labels += [name, *(["ground truth"] if truth is not None else []), "prediction"]
    return image_grid_png(tiles, labels, path, columns=3 if truth is not None else 2)


def evaluate_segmentation(pred: np.ndarray, target: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Per-class IoU (NaN: class absent from both) and mIoU over all classes and over defect classes only."""
    k = len(class_names)
    ious = iou_per_class(pred, target, k)
    defined = ious[1:][~np.isnan(ious[1:])]
    return {
        "miou": mean_iou(pred, target, k) if not np.isnan(ious).all() else float("nan"),
        "miou_defects": float(defined.mean()) if defined.size else float("nan"),
        "per_class_iou": {name: float(v) for name, v in zip(class_names, ious, strict=True)},
        "pixel_accuracy": float((pred == target).mean()),
    }


def train_segmenter(
    images: np.ndarray,
    masks: np.ndarray,
    config: SegmenterConfig | None = None,
    *,
    backbone: nn.Module | None = None,
    progress: bool = True,
    options: TrainOptions | None = None,
    checkpoints: str | os.PathLike | None = None,
) -> Segmenter:
    """Train a segmenter on (N, H, W, 3) uint8 images and (N, H, W) class-id masks; seeded, AdamW.

    Example:
        seg = train_segmenter(task.train_images, task.train_masks, SegmenterConfig(image_size=64, steps=200))

    ``options`` (device, precision, resume) and ``checkpoints`` (a folder) go to ``Segmenter.fit``.
    """
    segmenter = Segmenter(config, backbone=backbone)
    return segmenter.fit(images, masks, progress=progress, options=options, checkpoints=checkpoints)
