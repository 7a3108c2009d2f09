"""Defect-Gen-lite: a small joint image+mask diffusion model after Defect Spectrum's Defect-Gen, sized for a CPU.

The image (RGB in [-1, 1]) and its defect mask (one-hot over ``num_classes`` channels, background included) are
one ``(3 + K, S, S)`` tensor that is noised and denoised as a whole, so every sample comes with its own mask
(argmax over the mask channels). Two denoisers share the work: a *global* UNet with a large receptive field
(2x2 pixel blocks, two downsamplings, self-attention: the whole image) for the noisy steps that fix the layout,
and a *local* full-resolution conv net with a small receptive field (``local_receptive_field``: 17 px by default)
for the late steps that paint texture.

Timestep semantics (what this file implements):
    * ``t`` is an integer noise level in ``0..T`` (``T = timesteps``); ``t = 0`` is the clean sample and
      ``x_t = sqrt(abar(t)) x_0 + sqrt(1 - abar(t)) eps`` with the cosine schedule
      ``abar(t) = f(t) / f(0)``, ``f(t) = cos^2((t / T + s) / (1 + s) * pi / 2)``, ``s = 0.008`` (``abar(T) = 0``).
      Networks see ``t`` in ``1..T`` (the repo's 0-based index ``i`` is our ``t = i + 1``).
    * The networks predict ``x_0`` (x0-parameterisation); the loss is MSE over all channels, as in the repo.
    * ``switch_mode="described"`` (default): the global net denoises every step whose current level is
      ``t >= switch_step``, the local net every step with ``t < switch_step``. Each net is trained only on its own
      range (global: ``t`` in ``[switch_step, T]``, local: ``[1, switch_step - 1]``).
    * ``switch_mode="repo"`` reproduces Defect-Gen's ``scripts/inference.py``: the global net runs a full chain from
      pure noise labelled ``t = T - switch_step`` down to 0, then the local net re-denoises that output as if it were
      ``x_{switch_step}`` down to 0; both nets are then trained on all of ``[1, T]``.
    * Sampling is strided (``sample_steps`` levels evenly spaced from T to 0) with the repo's deterministic
      cold-diffusion update ``x_{t'} = x_t - q(x0_hat_c, t, eps_hat) + q(x0_hat_c, t', eps_hat)``, where
      ``eps_hat`` comes from the unclamped ``x0_hat`` and ``x0_hat_c`` is it clamped to [-1, 1]; without clamping
      this is exactly DDIM with eta = 0.

Departures from the reference notes (``industrial.md`` §1.3 and §8a) and from the repo:
    * At ``t = switch_step`` exactly the global net runs (the notes give that level to the small net).
    * One-hot mask values are {-1, +1} (``onehot_low=-1``) instead of the repo's {0, 1}, so mask channels span the
      same range as RGB; pass ``onehot_low=0.0`` for the repo's encoding.
    * ``precondition`` (default ``"none"`` = the repo's raw ``x0_hat = F(x_t)``) can wrap the ``"local"`` or
      ``"both"`` nets EDM-style, ``x0_hat = c_skip x_t + c_out F(c_in x_t)`` (still an x0 prediction; a zero net
      gives the Gaussian posterior mean). Measured on 15 DS-Synth bricks it is worse: after 600-1200 CPU steps the
      nets did not cancel the pixel noise that ``c_skip x_t`` lets through, and samples were colour speckle,
      while raw nets gave clean (if blurry) images (``/tmp/notes/defectgen.md``).
    * Defect pixels weigh ``1 + defect_weight`` in the MSE (default 5; 0 = the repo's plain MSE): DS-Synth defects
      cover about 1-2 % of a 64 px image, so with plain MSE the mask channels are almost all background.
    * The local net has per-pixel channel norms instead of GroupNorm (so its receptive field is truly local) and
      trains on random ``local_crop`` crops (32 px), which is exact for a fully local net and 4x cheaper.
    * Small nets (global: 32-64-64 channels on 2x2 pixel blocks, attention at 16 and 8 px; local: 32 channels,
      3 blocks) instead of 128/192 channels, 64 px instead of 256 px, ``train_steps`` per net instead of 160k,
      one training set for both nets (the repo uses 5 vs 50 images per type), flip/rot90 augmentation, an EMA of
      the weights with warm-up, AdamW with warm-up + cosine decay instead of a constant 1e-4.
    * ``normals`` (defect-free images, all-background masks) feed only the local net, and only with
      ``use_normals=True``; the repo has no such input.

Cost (measured, one thread): fitting 15 images at 64 px takes about 4 CPU-minutes with the defaults (800 steps
per net: 219 s; 1200 steps: 354 s); 50 samples take about 14 CPU-seconds. For a quick run
shrink ``train_steps`` (per net), ``global_width``, ``local_width`` and ``sample_steps``;
``DefectGenConfig.quick()`` does so (300 steps, widths 16, 10 sampling steps). Under torchrun each process trains
on its slice of every batch; images, flips, crops, timesteps and noise are drawn for the global batch.

Example:
    gen = DefectGenLite(DefectGenConfig(num_classes=7)).fit(images, masks)
    images, masks = gen.sample(50, seed=0)  # (50, 64, 64, 3) uint8, (50, 64, 64) int64
    gen.save("runs/defectgen/v0"); gen = DefectGenLite.load("runs/defectgen/v0")

Length: one model (its config, fit/sample/save) that is read together; the schedule and the two denoisers are
``defectgen_nets``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from potpourri.core.errors import PotpourriError
from potpourri.core.io import load_bundle, save_bundle
from potpourri.core.training import EMA, Trainer, TrainOptions, autocast, check_precision, resolve_device
from potpourri.segment.defectgen_nets import (
    GlobalUNet,
    LocalDenoiser,
    cosine_alpha_bar,
    local_receptive_field,
    q_sample,
)

__all__ = [
    "DefectGenConfig",
    "DefectGenLite",
    "GlobalUNet",
    "LocalDenoiser",
    "cosine_alpha_bar",
    "local_receptive_field",
    "preview_grid",
    "q_sample",
]

FORMAT_VERSION = 1
CONFIG_FILE = "defectgen.json"
TENSORS_FILE = "defectgen.safetensors"


class _WarmupEMA(EMA):
    """The EMA of a denoiser's weights with a warm-up, ``decay = min(ema_decay, (1 + step) / (10 + step))`` (so
    short runs are not stuck at the initialisation); 0 disables it. ``trainer`` gives the step."""

    trainer: Trainer

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        step = self.trainer.step  # called by Trainer.update before it counts the step: 0, 1, ...
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, param in model.named_parameters():
            if decay > 0:
                self.shadow[name].mul_(decay).add_(param.detach(), alpha=1 - decay)
            else:
                self.shadow[name].copy_(param.detach())


# ----------------------------------------------------------------------------------------------- config
@dataclass
class DefectGenConfig:
    """Defect-Gen-lite settings; ``num_classes`` counts mask classes including background 0 (DS-Synth: 7)."""

    image_size: int = 64
    num_classes: int = 7
    timesteps: int = 1000
    switch_step: int = 400  # global net for t >= switch_step, local net below (Defect-Gen's --step_inference 400)
    switch_mode: str = "described"  # or "repo" (reproduces Defect-Gen's inference.py staging)
    global_width: int = 32
    global_mults: tuple[int, ...] = (1, 2, 2)
    global_patch: int = 2  # the global UNet works on 2x2 pixel blocks (levels 32, 16, 8 px for 64 px images)
    local_width: int = 32
    local_blocks: int = 3  # receptive field 1 + 2 * (2 * blocks + 2) px: 17 px for 3 blocks
    local_crop: int = 32  # the local net trains on random crops of this side (it only sees 17 px anyway); 0 = full
    train_steps: int = 800  # per denoiser
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.002
    warmup_steps: int = 50
    ema_decay: float = 0.995  # 0 disables the EMA
    defect_weight: float = 5.0  # extra loss weight on defect pixels (all channels); 0 = the repo's plain MSE
    onehot_low: float = -1.0  # value of "not this class" in the mask channels (repo: 0.0)
    augment: bool = True  # random flips and 90-degree turns, applied to image and mask together
    use_normals: bool = False  # add defect-free images (all-background masks) to the local net's data
    clip_x0: bool = True
    precondition: str = "none"  # EDM-style skip around "none", "local" or "both" nets (still an x0 prediction)
    data_std: float = 0.5  # the Gaussian prior's std in the preconditioning
    sample_steps: int = 20
    sample_batch: int = 25
    seed: int = 0
    progress: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> DefectGenConfig:
        """A smaller, faster config for smoke runs: fewer steps, narrower nets, fewer sampling steps."""
        base = {"train_steps": 300, "global_width": 16, "local_width": 16, "sample_steps": 10}
        return cls(**{**base, **overrides})

    def validate(self) -> None:
        """Raise PotpourriError on an impossible setting."""
        levels = self.global_patch * 2 ** (len(self.global_mults) - 1)
        if self.image_size < 8 or self.image_size % levels:
            raise PotpourriError(f"image_size {self.image_size} must be >= 8 and divisible by {levels}")
        if self.num_classes < 2:
            raise PotpourriError(f"num_classes {self.num_classes} must be >= 2 (background + one defect class)")
        if not 1 < self.switch_step < self.timesteps:
            raise PotpourriError(f"switch_step {self.switch_step} must lie in 2..{self.timesteps - 1} (timesteps-1)")
        if self.precondition not in ("none", "local", "both"):
            raise PotpourriError(f"precondition '{self.precondition}' is unknown; choose 'none', 'local' or 'both'")
        if self.switch_mode not in ("described", "repo"):
            raise PotpourriError(f"switch_mode '{self.switch_mode}' is unknown; choose 'described' or 'repo'")
        if self.global_width % 8 or self.local_width % 8:
            raise PotpourriError("global_width and local_width must be multiples of 8 (GroupNorm groups)")
        if self.local_crop and self.local_crop < local_receptive_field(self.local_blocks):
            raise PotpourriError(
                f"local_crop {self.local_crop} is below the local receptive field "
                f"({local_receptive_field(self.local_blocks)} px); raise it or set 0 for full images"
            )
        if not 2 <= self.sample_steps <= self.timesteps:
            raise PotpourriError(f"sample_steps {self.sample_steps} must lie in 2..{self.timesteps}")
        if self.train_steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise PotpourriError("train_steps must be >= 0, batch_size >= 1 and lr > 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DefectGenConfig:
        """Rebuild a config from ``to_dict`` output; unknown keys are an error (a file from another version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise PotpourriError(
                f"unknown Defect-Gen-lite config keys {unknown}; the model was saved by another version"
            )
        data = dict(data)
        if "global_mults" in data:
            data["global_mults"] = tuple(data["global_mults"])
        return cls(**data)


# ----------------------------------------------------------------------------------------------- the generator
class DefectGenLite:
    """Joint image+mask diffusion with a global (large-field) and a local (small-field) x0 denoiser.

    Implements the ``DefectGenerator`` protocol: ``fit(images, masks, normals=None) -> self`` and
    ``sample(n, seed) -> (images uint8 (n, S, S, 3), masks int64 (n, S, S))``.
    Example:
        images, masks = DefectGenLite(DefectGenConfig(num_classes=7)).fit(x, m).sample(50, seed=0)
    """

    name = "defectgen-lite"

    def __init__(self, config: DefectGenConfig | None = None) -> None:
        self.config = config or DefectGenConfig()
        self.config.validate()
        cfg = self.config
        self.channels = 3 + cfg.num_classes
        self.alpha_bar = cosine_alpha_bar(cfg.timesteps)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.global_net = GlobalUNet(
                self.channels,
                width=cfg.global_width,
                mults=tuple(cfg.global_mults),
                timesteps=cfg.timesteps,
                image_size=cfg.image_size,
                patch=cfg.global_patch,
            )
            self.local_net = LocalDenoiser(
                self.channels, width=cfg.local_width, blocks=cfg.local_blocks, timesteps=cfg.timesteps
            )
        self.global_net.eval()
        self.local_net.eval()
        self.fitted = False
        self.notes: list[str] = []
        self.history: list[dict[str, float]] = []  # per logged step: net, step, loss
        self.fit_info: dict[str, Any] = {}

    # -- data
    def _resize(self, images: np.ndarray, masks: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        size = self.config.image_size
        if images.shape[1:3] == (size, size):
            return images, masks
        self.notes.append(f"images of {images.shape[1]}x{images.shape[2]} px resized to {size}x{size}")
        resized = [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in images]
        out_masks = None
        if masks is not None:
            out_masks = np.stack(
                [
                    np.asarray(Image.fromarray(m.astype(np.int32)).resize((size, size), Image.Resampling.NEAREST))
                    for m in masks
                ]
            ).astype(np.int64)
        return np.stack(resized), out_masks

    def _encode(self, images: np.ndarray, masks: np.ndarray) -> torch.Tensor:
        """uint8 images + class-id masks -> (N, 3 + K, S, S) in [-1, 1] with one-hot mask channels."""
        rgb = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, S, S)
        onehot = F.one_hot(torch.from_numpy(masks).long(), self.config.num_classes).permute(0, 3, 1, 2).float()
        low = self.config.onehot_low
        return torch.cat([rgb, onehot * (1.0 - low) + low], dim=1)

    def prepare(
        self, images: np.ndarray, masks: np.ndarray, normals: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Check and encode the training data; returns (defect tensors, normal tensors or None)."""
        from potpourri.segment.segmenter import check_images, check_masks

        images = check_images(images, "images")
        masks = check_masks(masks, images, self.config.num_classes)  # unknown ids: set DefectGenConfig(num_classes=)
        images, masks = self._resize(images, masks)
        data = self._encode(images, masks)
        normal_data = None
        if normals is not None:
            normals = check_images(normals, "normals")
            normals, _ = self._resize(normals, None)
            normal_data = self._encode(normals, np.zeros(normals.shape[:3], np.int64))
        return data, normal_data

    # -- training
    def ranges(self) -> dict[str, tuple[int, int]]:
        """Inclusive training ranges of t per net (the ``switch_mode`` decides them)."""
        cfg = self.config
        if cfg.switch_mode == "repo":
            return {"global": (1, cfg.timesteps), "local": (1, cfg.timesteps)}
        return {"global": (cfg.switch_step, cfg.timesteps), "local": (1, cfg.switch_step - 1)}

    def networks(self) -> dict[str, nn.Module]:
        return {"global": self.global_net, "local": self.local_net}

    def predict_x0(self, net_name: str, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's clean-sample estimate: ``F(x_t)``, or ``c_skip x_t + c_out F(c_in x_t)`` if preconditioned."""
        net = self.networks()[net_name]
        if self.config.precondition not in ("both", net_name):
            return net(x_t, t)
        # EDM preconditioning written for the VP process: with F = 0 this is the exact posterior mean
        # E[x0 | x_t] for data ~ N(0, sd^2), so the net only learns what a Gaussian prior cannot explain
        a = self.alpha_bar.to(x_t.device, x_t.dtype)[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        sd2 = self.config.data_std**2
        denom = (1 - a) + a * sd2
        c_skip, c_out, c_in = (
            sd2 * a.sqrt() / denom,
            self.config.data_std * (1 - a).sqrt() / denom.sqrt(),
            denom.rsqrt(),
        )
        return c_skip * x_t + c_out * net(c_in * x_t, t)

    def defect_weights(self, x0: torch.Tensor) -> torch.Tensor:
        """The MSE's pixel weights (B, 1, S, S): ``1 + defect_weight`` on defect pixels, 1 elsewhere."""
        # defects cover ~1-5 % of pixels; weight them so the mask channels do not collapse to background
        defect = (x0[:, 3:4] < (1.0 + self.config.onehot_low) / 2).float()  # background channel is "off"
        return 1.0 + self.config.defect_weight * defect

    def x0_loss(
        self,
        net_name: str,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        *,
        weight_mean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training objective: MSE between the net's x0 prediction from ``x_t`` and ``x0`` over all channels,
        defect pixels weighted ``1 + defect_weight`` (normalised by the mean weight: of this batch, or
        ``weight_mean``, e.g. the global batch's when this batch is one process's slice of it)."""
        x_t = q_sample(x0, t, noise, self.alpha_bar)
        error = (self.predict_x0(net_name, x_t, t) - x0).square()  # (B, C, S, S)
        if self.config.defect_weight == 0:
            return error.mean()
        weight = self.defect_weights(x0)  # (B, 1, S, S)
        return (error * weight).mean() / (weight.mean() if weight_mean is None else weight_mean)

    def _augment(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        turns = torch.randint(0, 4, (len(batch),), generator=generator).tolist()
        flips = (torch.rand(len(batch), generator=generator) < 0.5).tolist()
        out = [torch.rot90(x, k, dims=(1, 2)) for x, k in zip(batch, turns, strict=True)]
        return torch.stack([x.flip(2) if f else x for x, f in zip(out, flips, strict=True)])

    def _crop(self, batch: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
        corners = torch.randint(0, batch.shape[-1] - side + 1, (len(batch), 2), generator=generator).tolist()
        return torch.stack([x[:, y : y + side, z : z + side] for x, (y, z) in zip(batch, corners, strict=True)])

    def _train_net(
        self,
        net_name: str,
        data: torch.Tensor,
        generator: torch.Generator,
        options: TrainOptions,
        folder: Path | None,
    ) -> float:
        """One phase: train ``net_name`` for ``train_steps`` through a ``Trainer`` (checkpoints in ``folder``), then
        load its EMA weights."""
        cfg = self.config
        net = self.networks()[net_name]
        net.train().to(resolve_device(options.device))  # first, so that the EMA's copies live on the same device
        ema = _WarmupEMA(net, cfg.ema_decay)  # updated and checkpointed by the trainer
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(1, min(cfg.warmup_steps, cfg.train_steps // 5))

        def schedule(step: int) -> float:  # linear warm-up, then cosine decay to 10 % of lr
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, cfg.train_steps - warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        trainer = Trainer(
            net, optimizer, total_steps=cfg.train_steps, options=options, folder=folder, ema=ema,
            schedulers={"lr": scheduler}, generators={"data": generator}, desc=f"Defect-Gen-lite {net_name} net",
        )  # fmt: skip
        ema.trainer = trainer
        state = trainer.state
        state.setdefault("running", None)
        state.setdefault("history", [])
        low, high = self.ranges()[net_name]
        for step in trainer.steps():
            index = torch.randint(0, len(data), (cfg.batch_size,), generator=generator)
            x0 = data[index]
            if cfg.augment:
                x0 = self._augment(x0, generator)
            if net_name == "local" and 0 < cfg.local_crop < cfg.image_size:
                x0 = self._crop(x0, cfg.local_crop, generator)
            t = torch.randint(low, high + 1, (cfg.batch_size,), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)  # drawn on the CPU: the same on every device
            # every draw above is of the global batch (one generator state everywhere); this process takes its slice,
            # and the defect weights are normalised by the global batch's mean weight (all of x0 is known here)
            local, share = trainer.shard(list(range(cfg.batch_size)))
            weight_mean = None
            if trainer.group.distributed:
                weight_mean = self.defect_weights(x0).mean().to(trainer.device)
                x0, t, noise = x0[local], t[local], noise[local]
            x0, t, noise = x0.to(trainer.device), t.to(trainer.device), noise.to(trainer.device)
            with trainer.autocast():
                loss = self.x0_loss(net_name, x0, t, noise, weight_mean=weight_mean) * share
            # the loop's state first (update() may write a checkpoint); the global batch's loss under torchrun
            value = trainer.mean_over_processes(loss.detach().float().item())
            running = state["running"]
            state["running"] = value if running is None else 0.95 * running + 0.05 * value
            if step % 25 == 0 or step == cfg.train_steps - 1:
                state["history"].append({"net": net_name, "step": step, "loss": value})
            trainer.update(loss, net=net_name)  # NaN stop, backward, clip, AdamW, schedule, EMA, checkpoint
        trainer.finish()  # a resumed run finds this phase finished and skips its loop
        with torch.no_grad():
            for name, param in net.named_parameters():
                param.copy_(ema.shadow[name])
        net.eval()
        self.history.extend(state["history"])
        running = state["running"]
        return float(running) if running is not None else float("nan")

    def fit(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        normals: np.ndarray | None = None,
        *,
        options: TrainOptions | None = None,
        checkpoints: str | os.PathLike | None = None,
    ) -> DefectGenLite:
        """Train both denoisers on defect images (N, H, W, 3) uint8 and class-id masks (N, H, W); returns self.

        ``options``: device, precision, resume (default: ``TrainOptions(progress=config.progress)``; gradients are
        clipped at norm 1 unless ``options.grad_clip`` says otherwise). ``checkpoints``: a folder with one sub-folder
        per phase (``global``, then ``local``); with ``options.resume`` a finished phase is restored, not retrained."""
        cfg = self.config
        options = options or TrainOptions(progress=cfg.progress)
        if options.grad_clip is None:
            options = dataclasses.replace(options, grad_clip=1.0)
        folder = Path(checkpoints) if checkpoints is not None else None
        data, normal_data = self.prepare(images, masks, normals)
        local_data = data
        if normal_data is not None and cfg.use_normals:
            local_data = torch.cat([data, normal_data])
        elif normal_data is not None:
            self.notes.append("normals were given but use_normals=False: not used")
        generator = torch.Generator().manual_seed(cfg.seed)
        start = time.perf_counter()
        final = {}
        with torch.enable_grad():  # also when called under torch.no_grad()
            for net_name, net_data in (("global", data), ("local", local_data)):
                phase = folder / net_name if folder is not None else None
                if net_name == "local" and options.resume and not (phase / "last.json").is_file():
                    options = dataclasses.replace(options, resume=False)  # killed before its first checkpoint
                final[net_name] = self._train_net(net_name, net_data, generator, options, phase)
        self.fitted = True
        self.fit_info = {
            "n_images": len(data),
            "n_normals": 0 if normal_data is None else len(normal_data),
            "seconds": round(time.perf_counter() - start, 2),
            "final_loss": final,
            "threads": torch.get_num_threads(),
        }
        return self

    # -- sampling
    def sampling_plan(self) -> list[tuple[str, int, int]]:
        """The denoising steps as (net, t, t_next), in order; see the module docstring for the semantics."""
        cfg = self.config

        def levels(top: int, n: int) -> list[int]:
            return sorted({round(float(v)) for v in np.linspace(top, 0, n + 1)}, reverse=True)

        if cfg.switch_mode == "repo":
            first = max(1, round(cfg.sample_steps * (cfg.timesteps - cfg.switch_step) / cfg.timesteps))
            second = max(1, cfg.sample_steps - first)
            stage1 = levels(cfg.timesteps - cfg.switch_step, first)
            stage2 = levels(cfg.switch_step, second)
            return [("global", a, b) for a, b in itertools.pairwise(stage1)] + [
                ("local", a, b) for a, b in itertools.pairwise(stage2)
            ]
        ts = levels(cfg.timesteps, cfg.sample_steps)
        return [("global" if a >= cfg.switch_step else "local", a, b) for a, b in itertools.pairwise(ts)]

    def _place(self, device: str | None, precision: str) -> torch.device:
        """Move both nets to ``device`` (None: leave them where they are); the device they run on."""
        if device is not None:
            where = resolve_device(device)
            for net in self.networks().values():
                net.to(where)
        else:
            params = [p for net in self.networks().values() for p in net.parameters()]
            where = params[0].device if params else torch.device("cpu")
        check_precision(precision, where)
        return where

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, *, precision: str = "fp32") -> torch.Tensor:
        """Run the sampling plan from ``x`` (pure noise, (B, 3 + K, S, S), on the nets' device) to a clean joint
        sample; the nets run under ``precision`` autocast, the update itself in fp32."""
        alpha_bar = self.alpha_bar
        for net_name, t, t_next in self.sampling_plan():
            a, a_next = float(alpha_bar[t]), float(alpha_bar[t_next])
            with autocast(x.device, precision):
                x0_raw = self.predict_x0(net_name, x, torch.full((len(x),), t, dtype=torch.long, device=x.device))
            x0_raw = x0_raw.float()
            eps = (x - math.sqrt(a) * x0_raw) / math.sqrt(max(1.0 - a, 1e-12))
            x0 = x0_raw.clamp(-1.0, 1.0) if self.config.clip_x0 else x0_raw
            # Defect-Gen's cold-diffusion step: x_t - q(x0, t, eps) + q(x0, t_next, eps)
            here = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
            x = x - here + (math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps)
        return x

    def sample(
        self, n: int, seed: int, *, device: str | None = None, precision: str = "fp32"
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` joint samples: images (n, S, S, 3) uint8 and masks (n, S, S) int64 (argmax of the mask channels);
        ``device`` (None: where the nets are) and ``precision`` say where and how the nets run."""
        if not self.fitted:
            raise PotpourriError("Defect-Gen-lite is not trained; call fit(images, masks) or DefectGenLite.load(dir)")
        if n < 0:
            raise PotpourriError(f"n={n} must be >= 0")
        size, cfg = self.config.image_size, self.config
        if n == 0:
            return np.zeros((0, size, size, 3), np.uint8), np.zeros((0, size, size), np.int64)
        where = self._place(device, precision)
        generator = torch.Generator().manual_seed(int(seed))
        # one draw per sample, so the first k of sample(n, seed) equal sample(k, seed)
        noise = torch.stack([torch.randn(self.channels, size, size, generator=generator) for _ in range(n)])
        chunks = noise.split(cfg.sample_batch)
        out = torch.cat([self.denoise(c.to(where), precision=precision).cpu() for c in chunks])  # (n, 3 + K, S, S)
        images = ((out[:, :3].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        masks = out[:, 3:].argmax(dim=1).to(torch.int64).numpy()
        return np.ascontiguousarray(images), masks

    # -- persistence
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"global.{k}": v.detach().cpu() for k, v in self.global_net.state_dict().items()}
        tensors.update({f"local.{k}": v.detach().cpu() for k, v in self.local_net.state_dict().items()})
        return tensors

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``defectgen.safetensors`` and ``defectgen.json`` (config, fit info) atomically; returns the folder."""
        if not self.fitted:
            raise PotpourriError("nothing to save: call fit(images, masks) first")
        folder = Path(folder)
        meta = {
            "format": "potpourri.defectgen",
            "format_version": FORMAT_VERSION,
            "method": self.name,
            "config": self.config.to_dict(),
            "fit_info": self.fit_info,
            "notes": self.notes,
        }
        tensors = self.state_tensors()
        save_bundle(folder / TENSORS_FILE, tensors, folder / CONFIG_FILE, meta, tensor_metadata={"method": self.name})
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> DefectGenLite:
        """Load a generator written by ``save``."""
        folder = Path(folder)
        meta, tensors = load_bundle(
            folder / TENSORS_FILE,
            folder / CONFIG_FILE,
            missing=f"no Defect-Gen-lite model in '{folder}' ({CONFIG_FILE} missing); fit and save one",
            fix="refit the generator with this potpourri",
            format="potpourri.defectgen",
            format_version=FORMAT_VERSION,
        )
        gen = cls(DefectGenConfig.from_dict(meta["config"]))
        for prefix, net in gen.networks().items():
            part = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            try:
                net.load_state_dict(part)
            except RuntimeError as exc:
                raise PotpourriError(f"'{folder}': {prefix} net weights do not match the saved config") from exc
        gen.fitted, gen.fit_info, gen.notes = True, meta.get("fit_info", {}), list(meta.get("notes", []))
        return gen


def preview_grid(images: np.ndarray, masks: np.ndarray, *, columns: int = 8) -> np.ndarray:
    """A uint8 grid: each row of ``columns`` images is followed by a row of their palette-coloured masks."""
    from potpourri.data.synth import PALETTE

    palette = np.array(PALETTE, np.uint8)
    n, size = len(images), images.shape[1]
    rows = math.ceil(n / columns)
    grid = np.full((rows * 2 * (size + 2), columns * (size + 2), 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = r * 2 * (size + 2), c * (size + 2)
        grid[y : y + size, x : x + size] = images[i]
        grid[y + size + 2 : y + 2 * size + 2, x : x + size] = palette[np.clip(masks[i], 0, len(palette) - 1)]
    return grid
