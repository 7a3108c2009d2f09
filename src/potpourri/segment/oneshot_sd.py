"""SLiMe's own feature source: Stable Diffusion attention recorded by diffusers attention processors.

``StableDiffusionSource`` runs a frozen ``UNet2DConditionModel`` on a noised latent with the learned class tokens
as text; ``RecordingAttnProcessor`` keeps the cross-attention of pixels to those tokens and the self-attention
(its output equals diffusers' own processor). Needs SD weights on disk (``--sd-weights DIR``); nothing downloads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.segment.features import AttentionMaps, FeatureSource

__all__ = ["AttentionStore", "RecordingAttnProcessor", "StableDiffusionSource", "install_attention_recorders"]

# SLiMe's taps in SD 2.1-base (src/arguments.py): cross-attention at 16² and 32², self-attention at 64²
SD_CROSS_LAYERS = (
    "up_blocks.1.attentions.0",
    "up_blocks.1.attentions.1",
    "up_blocks.1.attentions.2",
    "up_blocks.2.attentions.0",
    "up_blocks.2.attentions.1",
)
SD_SELF_LAYERS = ("up_blocks.3.attentions.0", "up_blocks.3.attentions.1", "up_blocks.3.attentions.2")
_SD_FIX = (
    "download Stable Diffusion 2.1-base in diffusers format on a machine with internet "
    "(`huggingface-cli download stabilityai/stable-diffusion-2-1-base --local-dir DIR`) and pass --sd-weights DIR"
)


class AttentionStore:
    """Attention probabilities (and pre-softmax scores of cross-attention) recorded by ``RecordingAttnProcessor``."""

    def __init__(self) -> None:
        self.probs: dict[str, torch.Tensor] = {}  # layer -> (B, heads, N_query, N_key)
        self.scores: dict[str, torch.Tensor] = {}  # cross layers only, pre-softmax
        self.cross_layers: set[str] = set()

    def clear(self) -> None:
        self.probs.clear()
        self.scores.clear()
        self.cross_layers.clear()

    def record(self, name: str, probs: torch.Tensor, scores: torch.Tensor, *, cross: bool) -> None:
        self.probs[name] = probs
        if cross:
            self.scores[name] = scores
            self.cross_layers.add(name)

    def cross_maps(
        self, n_tokens: int, latent_hw: tuple[int, int], grid: tuple[int, int], *, batch: slice = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and probabilities of tokens 0..n_tokens-1 averaged over heads and layers at ``grid``, (B, K, h, w)."""
        if not self.cross_layers:
            raise PotpourriError("no cross-attention was recorded: check the cross-attention layer names")
        out = []
        for table in (self.scores, self.probs):
            maps = []
            for name in sorted(self.cross_layers):
                values = table[name][batch, :, :, :n_tokens].mean(1)  # (B, N, K)
                h, w = _layer_hw(values.shape[1], latent_hw)
                values = values.transpose(1, 2).reshape(values.shape[0], n_tokens, h, w)  # (B, K, h, w)
                maps.append(values if (h, w) == grid else F.interpolate(values, size=grid, mode="bilinear"))
            out.append(torch.stack(maps).mean(0))
        return out[0], out[1]

    def self_attention(self, *, batch: slice = slice(None)) -> torch.Tensor:
        """Self-attention probabilities averaged over heads and layers, (B, N, N); layers must share N."""
        names = sorted(set(self.probs) - self.cross_layers)
        if not names:
            raise PotpourriError("no self-attention was recorded: check the self-attention layer names")
        sizes = {self.probs[n].shape[-1] for n in names}
        if len(sizes) > 1:
            raise PotpourriError(f"self-attention layers {names} have different resolutions {sorted(sizes)}")
        return torch.stack([self.probs[n][batch].mean(1) for n in names]).mean(0)


def _layer_hw(n: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) grid of an attention layer with n query positions inside a latent of ``latent_hw``."""
    factor = math.sqrt(latent_hw[0] * latent_hw[1] / n)
    h, w = round(latent_hw[0] / factor), round(latent_hw[1] / factor)
    if h * w != n:
        raise PotpourriError(f"cannot place {n} attention positions on a grid of the latent {latent_hw}")
    return h, w


class RecordingAttnProcessor:
    """diffusers' default attention (``AttnProcessor``'s arithmetic) that also records its probabilities.

    Recording only stores tensors, so the output equals the default processor's; the stored tensors keep
    their autograd graph, so losses on them reach the text tokens.
    """

    def __init__(self, store: AttentionStore, name: str) -> None:
        self.store, self.name = store, name

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)  # (B, N, C)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)  # (B·heads, N_q, d)
        key = attn.head_to_batch_dim(key)  # (B·heads, N_k, d)
        value = attn.head_to_batch_dim(value)

        # the arithmetic of Attention.get_attention_scores, split so the pre-softmax scores can be kept
        dtype = query.dtype
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        if attention_mask is None:
            base = torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device)
            beta = 0
        else:
            base, beta = attention_mask, 1
        scores = torch.baddbmm(base, query, key.transpose(-1, -2), beta=beta, alpha=attn.scale)  # (B·h, N_q, N_k)
        if attn.upcast_softmax:
            scores = scores.float()
        probs = scores.softmax(dim=-1).to(dtype)
        heads = attn.heads
        self.store.record(
            self.name,
            probs.view(-1, heads, *probs.shape[1:]),
            scores.view(-1, heads, *scores.shape[1:]),
            cross=cross,
        )

        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))  # (B, N_q, C)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear projection, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_attention_recorders(
    unet: nn.Module, store: AttentionStore, *, cross_layers: Sequence[str], self_layers: Sequence[str]
) -> list[str]:
    """Give the attention modules under ``cross_layers`` (attn2) and ``self_layers`` (attn1) recording processors.

    Other layers keep their processors. Returns the names of the recorded layers; a prefix that matches no
    layer raises a one-line error listing the valid ones.
    """
    processors = dict(unet.attn_processors)
    chosen = []
    for prefixes, kind in ((cross_layers, "attn2"), (self_layers, "attn1")):
        for prefix in prefixes:
            hits = [n for n in processors if n.startswith(prefix + ".") and n.endswith(f".{kind}.processor")]
            if not hits:
                blocks = sorted({n.split(".transformer_blocks")[0] for n in processors})
                raise PotpourriError(f"no {kind} attention under '{prefix}' in this UNet; layers: {', '.join(blocks)}")
            chosen += hits
    for name in chosen:
        processors[name] = RecordingAttnProcessor(store, name.removesuffix(".processor"))
    unet.set_attn_processor(processors)
    return [n.removesuffix(".processor") for n in chosen]


class StableDiffusionSource(FeatureSource):
    """SLiMe's source: a frozen SD UNet; learned text tokens at prompt positions 1..K-1, position 0 = background.

    ``encode_prompt(text) -> (1, T, D)`` gives the text encoder's output (SLiMe optimises that output, not word
    embeddings). Example:
        source = StableDiffusionSource.from_pretrained("/models/sd-2-1-base")
    """

    name = "stable-diffusion"
    fixed_background = True

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module | None,
        scheduler: Any,
        encode_prompt: Callable[[str], torch.Tensor],
        *,
        cross_layers: Sequence[str] = SD_CROSS_LAYERS,
        self_layers: Sequence[str] = SD_SELF_LAYERS,
        resolution: int = 512,
        train_timesteps: tuple[int, int] = (5, 100),
        test_timestep: int = 100,
        guidance_scale: float = 100.0,
        noise_loss: bool = True,
    ) -> None:
        super().__init__()
        self.unet, self.vae, self.scheduler = unet, vae, scheduler
        self.encode_prompt = encode_prompt
        self.store = AttentionStore()
        self.recorded = install_attention_recorders(
            unet, self.store, cross_layers=cross_layers, self_layers=self_layers
        )
        self.input_size, self.train_timesteps, self.test_timestep = resolution, train_timesteps, test_timestep
        self.guidance_scale, self.noise_loss = guidance_scale, noise_loss
        self._contexts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.freeze()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None, **kwargs: Any) -> StableDiffusionSource:
        """Load UNet, VAE (encoder), scheduler, tokenizer and text encoder of a diffusers folder; never downloads."""
        if path is None or not (Path(path) / "unet").is_dir():
            raise PotpourriError(f"no Stable Diffusion weights at '{path}' (need DIR/unet, vae, ...): {_SD_FIX}")
        try:
            from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as exc:
            raise PotpourriError(
                "the Stable Diffusion source needs diffusers: pip install 'potpourri[diffusion]'"
            ) from exc
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
            text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise PotpourriError(f"could not load Stable Diffusion from '{path}' ({exc}); {_SD_FIX}") from exc
        vae.decoder = None  # never decoded: SLiMe deletes it too

        @torch.no_grad()
        def encode_prompt(text: str) -> torch.Tensor:
            ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)
            return text_encoder(torch.tensor([ids.input_ids]))[0]  # (1, T, D)

        return cls(unet, vae, scheduler, encode_prompt, **kwargs)

    def _context(self, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-encoder outputs of SLiMe's prompt "part part … part" (K-1 words) and of the empty prompt."""
        if num_classes not in self._contexts:
            prompt = self.encode_prompt(" ".join(["part"] * (num_classes - 1))).float()
            if prompt.shape[1] < num_classes:
                raise PotpourriError(
                    f"{num_classes} classes need {num_classes} prompt positions, got {prompt.shape[1]}"
                )
            self._contexts[num_classes] = (prompt, self.encode_prompt("").float())
        return self._contexts[num_classes]

    @property
    def token_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @torch.no_grad()
    def prepare(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images * 2 - 1  # (B, 3, R, R) in [-1, 1]
        if self.vae is None:  # a UNet on pixels (tests): the image is the latent
            return {"latents": x}
        # the posterior mean, not a sample, so that the same image always gives the same latent
        return {"latents": self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor}  # (B, 4, R/8, R/8)

    def attend(
        self,
        prepared: dict[str, torch.Tensor],
        tokens: torch.Tensor,
        *,
        train: bool,
        generator: torch.Generator,
        rows: Sequence[int] | None = None,
    ) -> AttentionMaps:
        latents = prepared["latents"]  # (B, 4, h, w)
        lo, hi = self.train_timesteps
        t = int(torch.randint(lo, hi + 1, (1,), generator=generator)) if train else self.test_timestep
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)  # CPU draw: the same everywhere
        if rows is not None:  # the noise of every image was drawn: the generator moves as in one process
            latents, noise = latents[rows], noise[rows]
        b, n_classes = latents.shape[0], tokens.shape[0] + 1
        prompt, empty = (c.to(latents.device) for c in self._context(n_classes))  # the text encoder stays put
        context = torch.cat([prompt[:, :1], tokens[None], prompt[:, n_classes:]], dim=1).expand(b, -1, -1)
        timestep = torch.tensor([t], device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, timestep)
        self.store.clear()
        guided = train and self.noise_loss
        if guided:  # SLiMe's batch: [unconditional, conditional]; maps come from the conditional half
            prediction = self.unet(
                torch.cat([noisy, noisy]), timestep, encoder_hidden_states=torch.cat([empty.expand(b, -1, -1), context])
            ).sample
            uncond, cond = prediction.chunk(2)
            aux = F.mse_loss(uncond + self.guidance_scale * (cond - uncond), noise)
            batch = slice(b, 2 * b)
        else:
            self.unet(noisy, timestep, encoder_hidden_states=context)
            aux, batch = None, slice(None)
        self_attention = self.store.self_attention(batch=batch)  # (B, N, N)
        grid = _layer_hw(self_attention.shape[-1], tuple(latents.shape[-2:]))
        scores, probs = self.store.cross_maps(n_classes, tuple(latents.shape[-2:]), grid, batch=batch)
        self.store.clear()
        # training: CE on raw scores, WAS on their softmax over classes; inference: probabilities over all tokens
        cross = scores.softmax(1) if train else probs
        return AttentionMaps(scores if train else probs, cross, self_attention, aux)

    def init_tokens(self, num_classes: int, generator: torch.Generator) -> torch.Tensor:
        return self._context(num_classes)[0][0, 1:num_classes].clone()  # the "part" tokens
