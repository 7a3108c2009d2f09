"""A SEED-style discrete visual tokenizer: causal Q-Former over frozen features -> VQ codebook -> feature decoder.

As in SEED (Ge et al., 2023): learnable queries attend to each other through a CAUSAL mask (so the token sequence is
left-to-right, like text) and cross-attend to a frozen encoder's feature tokens; each of the 32 query embeddings is
vector-quantised to a codebook entry (straight-through estimator, commitment loss; EMA codebook updates optional;
dead codes restarted from recent encoder outputs); a small decoder reconstructs the frozen features (pooled vector
or token grid) from the quantised tokens. Our target is the frozen EfficientNet-Lite0 feature, not SEED's
unCLIP-SD embedding (no Stable Diffusion weights here). ``add_image_tokens`` puts ``<img_0>``..``<img_{K-1}>``
into a causal LM's vocabulary so a VLM can emit image tokens; ``retrieve_nearest`` decodes tokens to features and
returns the nearest real image.

Example:
    tok = SEEDTokenizer(SEEDConfig(feature_dim=1280))
    history = train_tokenizer(tok, features, TokenizerTrainConfig(steps=300))   # features: (N, C, h, w), frozen
    codes = tok.tokenize(features)                                              # (N, 32) long
    vocab = add_image_tokens(lm, tokenizer, tok.config.codebook_size)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.io import load_bundle, save_bundle

__all__ = [
    "CausalQFormer",
    "ImageVocab",
    "Processes",
    "SEEDConfig",
    "SEEDTokenizer",
    "TokenizerOutput",
    "VectorQuantizer",
    "add_image_tokens",
    "codebook_usage",
    "load_tokenizer",
    "retrieve_nearest",
    "save_tokenizer",
]

TARGETS = ("pooled", "tokens")
TEXT_SOURCES = ("last", "codes")


@dataclass
class SEEDConfig:
    """Shapes and quantiser settings; saved as JSON next to the weights so they load into the same shapes."""

    feature_dim: int = 1280  # channels of the frozen feature map (EfficientNet-Lite0: 1280)
    num_queries: int = 32  # discrete tokens per image
    dim: int = 128  # Q-Former / decoder width
    heads: int = 4
    layers: int = 2
    codebook_size: int = 256  # K
    code_dim: int = 32  # codes live in a low-dimensional space (better usage than the full width)
    beta: float = 0.25  # commitment weight
    ema: bool = False  # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99
    restart_dead: bool = True  # restart codes unused since the last check from recent encoder outputs
    dead_threshold: float = 1.0  # a code used fewer times than this between checks is dead
    recent_size: int = 4096  # ring buffer of recent encoder outputs (restart candidates)
    target: str = "pooled"  # pooled | tokens: what the decoder reconstructs
    num_feature_tokens: int = 16  # h*w of the feature grid (target="tokens" only)
    text_dim: int = 0  # > 0: SEED's text alignment, a head from the last causal query to a caption space this wide
    text_from: str = "last"  # last: the last causal query (continuous) | codes: the quantised codes (straight-through)


# ----------------------------------------------------------------------------------------------------------------
# blocks


def causal_mask(n: int, device: torch.device | None = None) -> torch.Tensor:
    """``(n, n)`` bool mask, True where attention is forbidden (query i may see queries 0..i only)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


class QFormerLayer(nn.Module):
    """Pre-norm block: causal self-attention among queries, cross-attention to features, MLP."""

    def __init__(self, dim: int, heads: int, *, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        self.norm_self, self.norm_cross, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        mask = causal_mask(queries.shape[1], queries.device) if self.causal else None
        x = self.norm_self(queries)  # (B, Q, D)
        queries = queries + self.self_attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        x = self.norm_cross(queries)
        queries = queries + self.cross_attn(x, memory, memory, need_weights=False)[0]  # (B, Q, D)
        return queries + self.mlp(self.norm_mlp(queries))


class CausalQFormer(nn.Module):
    """Learnable queries -> causal self-attention + cross-attention to frozen feature tokens -> ``(B, Q, D)``."""

    def __init__(self, feature_dim: int, *, num_queries: int = 32, dim: int = 128, heads: int = 4, layers: int = 2):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.query_pos = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.memory_proj = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, dim))
        self.blocks = nn.ModuleList(QFormerLayer(dim, heads, causal=True) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, feature_tokens: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N, C)`` frozen tokens -> ``(B, Q, D)``; ``queries`` ``(B, Q, D)`` overrides the learned ones."""
        memory = self.memory_proj(feature_tokens)  # (B, N, D)
        if queries is None:
            queries = self.queries.expand(feature_tokens.shape[0], -1, -1)
        x = queries + self.query_pos  # (B, Q, D)
        for block in self.blocks:
            x = block(x, memory)
        return self.norm(x)


class Processes(Protocol):
    """What a forward pass needs from a torchrun job whose processes each hold a slice ``batch[rank::world]``
    (``core.training.Trainer`` is one): sums over processes and the global batch gathered back in its order."""

    def total_over_processes(self, value: torch.Tensor) -> torch.Tensor: ...

    def unshard(self, local: torch.Tensor) -> torch.Tensor: ...


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with straight-through gradients, commitment loss, optional EMA, dead-code restarts."""

    def __init__(self, size: int, dim: int, *, beta: float = 0.25, ema: bool = False, ema_decay: float = 0.99,
                 recent_size: int = 4096, eps: float = 1e-5) -> None:  # fmt: skip
        super().__init__()
        self.size, self.dim, self.beta, self.ema, self.decay, self.eps = size, dim, beta, ema, ema_decay, eps
        self.codebook = nn.Parameter(torch.randn(size, dim) / math.sqrt(dim), requires_grad=not ema)
        self.register_buffer("ema_count", torch.ones(size))  # N_k
        self.register_buffer("ema_sum", self.codebook.detach().clone())  # m_k, so e_k = m_k / N_k at start
        self.register_buffer("usage", torch.zeros(size))  # assignments since the last restart check
        self.register_buffer("recent", torch.zeros(recent_size, dim))  # ring buffer of encoder outputs
        self.register_buffer("recent_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("recent_next", torch.zeros((), dtype=torch.long))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean) for every row of ``z`` ``(M, d)`` -> ``(M,)``."""
        codes = self.codebook.detach()
        distances = z.pow(2).sum(1, keepdim=True) - 2 * z @ codes.T + codes.pow(2).sum(1)[None]  # (M, K)
        return distances.argmin(1)

    def forward(
        self, z: torch.Tensor, *, processes: Processes | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(..., d)`` -> straight-through quantised ``(..., d)``, indices ``(...)``, VQ loss (scalar); always in
        fp32 (autocast off): the codebook, usage counts and EMA sums are fp32 buffers. With ``processes`` (``z``
        of shape ``(b, ..., d)`` is this process's slice of the batch) the counts, EMA sums and remembered outputs
        are those of the global batch, the same in every process."""
        with torch.autocast(z.device.type, enabled=False):
            return self.quantise(z.float(), processes=processes)

    def quantise(
        self, z: torch.Tensor, *, processes: Processes | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The body of ``forward`` for fp32 ``z``."""
        flat = z.reshape(-1, self.dim)  # (M, d)
        indices = self.nearest(flat.detach())
        quantised = self.codebook[indices]  # (M, d)
        commitment = F.mse_loss(flat, quantised.detach())
        codebook_loss = 0.0 if self.ema else F.mse_loss(quantised, flat.detach())  # EMA moves the codes instead
        loss = codebook_loss + self.beta * commitment
        if self.training:
            with torch.no_grad():
                counts = torch.bincount(indices, minlength=self.size).float()
                self.usage += counts if processes is None else processes.total_over_processes(counts)
                # the whole batch's outputs in its order: a restart then draws the same rows in every process
                self._remember(flat.detach() if processes is None else processes.unshard(z.detach()).flatten(0, -2))
                if self.ema:
                    over = None if processes is None else processes.total_over_processes
                    self.ema_update(flat.detach(), indices, over_processes=over)
        quantised = flat + (quantised - flat).detach()  # straight-through: forward = code, backward = identity
        return quantised.view_as(z), indices.view(z.shape[:-1]), loss

    @torch.no_grad()
    def ema_update(
        self,
        z: torch.Tensor,
        indices: torch.Tensor,
        *,
        over_processes: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        """VQ-VAE EMA: ``N_k <- g N_k + (1-g) n_k``, ``m_k <- g m_k + (1-g) sum z``, ``e_k = m_k / smoothed N_k``;
        ``over_processes`` sums ``n_k`` and ``sum z`` over processes (each holding a slice of the batch)."""
        onehot = F.one_hot(indices, self.size).to(z.dtype)  # (M, K)
        counts, sums = onehot.sum(0), onehot.T @ z  # (K,), (K, d)
        if over_processes is not None:
            counts, sums = over_processes(counts), over_processes(sums)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (total + self.size * self.eps) * total  # Laplace smoothing
        self.codebook.data.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _remember(self, z: torch.Tensor) -> None:
        n = min(z.shape[0], self.recent.shape[0])
        slots = (self.recent_next + torch.arange(n, device=z.device)) % self.recent.shape[0]
        self.recent[slots] = z[-n:]
        self.recent_next.copy_((self.recent_next + n) % self.recent.shape[0])
        self.recent_filled.copy_(torch.clamp(self.recent_filled + n, max=self.recent.shape[0]))

    @torch.no_grad()
    def restart_dead_codes(self, threshold: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace codes used fewer than ``threshold`` times since the last check by random recent encoder outputs.

        Returns the restarted code indices and clears the usage counts.
        """
        dead = (self.usage < threshold).nonzero().flatten()
        filled = int(self.recent_filled)
        if len(dead) and filled:
            pick = torch.randint(filled, (len(dead),), generator=generator).to(self.recent.device)
            fresh = self.recent[pick]  # (n_dead, d)
            self.codebook.data[dead] = fresh
            self.ema_sum[dead] = fresh
            self.ema_count[dead] = 1.0
        else:
            dead = dead[:0]
        self.usage.zero_()
        return dead


class FeatureDecoder(nn.Module):
    """Quantised tokens ``(B, Q, d)`` -> frozen-feature reconstruction: pooled ``(B, C)`` or tokens ``(B, N, C)``."""

    def __init__(self, code_dim: int, feature_dim: int, *, dim: int = 128, heads: int = 4, layers: int = 1,
                 outputs: int = 1) -> None:  # fmt: skip
        super().__init__()
        self.inp = nn.Linear(code_dim, dim)
        self.readout = nn.Parameter(torch.randn(outputs, dim) * 0.02)  # one learned query per reconstructed token
        self.blocks = nn.ModuleList(QFormerLayer(dim, heads, causal=False) for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, feature_dim))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        memory = self.inp(codes)  # (B, Q, D)
        x = self.readout.expand(codes.shape[0], -1, -1)  # (B, N, D)
        for block in self.blocks:
            x = block(x, memory)
        return self.out(x)  # (B, N, C)


# ----------------------------------------------------------------------------------------------------------------
# model


@dataclass
class TokenizerOutput:
    """One forward pass: total loss, its parts, the discrete codes and the reconstruction."""

    loss: torch.Tensor
    recon_loss: torch.Tensor
    vq_loss: torch.Tensor
    indices: torch.Tensor  # (B, Q) long
    reconstruction: torch.Tensor  # (B, C) pooled or (B, N, C) tokens
    target: torch.Tensor  # same shape as reconstruction
    text: torch.Tensor | None = None  # (B, text_dim): the last query or the codes in the caption space (text_dim > 0)


def _feature_tokens(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` map or ``(B, N, C)`` tokens -> ``(B, N, C)``."""
    if features.ndim == 4:
        return features.flatten(2).transpose(1, 2)
    if features.ndim == 3:
        return features
    raise PotpourriError(f"features of shape {tuple(features.shape)}: pass a (B, C, h, w) map or (B, N, C) tokens")


class SEEDTokenizer(nn.Module):
    """Frozen features -> causal Q-Former -> 32 VQ codes -> decoder reconstructing the features."""

    def __init__(self, config: SEEDConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or SEEDConfig()
        if cfg.target not in TARGETS:
            raise PotpourriError(f"unknown reconstruction target '{cfg.target}'; choose from {', '.join(TARGETS)}")
        if cfg.text_from not in TEXT_SOURCES:
            raise PotpourriError(f"unknown text source '{cfg.text_from}'; choose from {', '.join(TEXT_SOURCES)}")
        self.qformer = CausalQFormer(cfg.feature_dim, num_queries=cfg.num_queries, dim=cfg.dim, heads=cfg.heads,
                                     layers=cfg.layers)  # fmt: skip
        self.to_code = nn.Linear(cfg.dim, cfg.code_dim)
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, beta=cfg.beta, ema=cfg.ema,
                                         ema_decay=cfg.ema_decay, recent_size=cfg.recent_size)  # fmt: skip
        outputs = 1 if cfg.target == "pooled" else cfg.num_feature_tokens
        self.decoder = FeatureDecoder(cfg.code_dim, cfg.feature_dim, dim=cfg.dim, heads=cfg.heads, outputs=outputs)
        # SEED aligns the causal Q-Former's final embedding (it has seen every earlier query) with the caption's;
        # text_from="codes" reads the quantised codes instead (a learned query attending to them), so only what
        # survives quantisation can match the caption, and discrete tokens alone (an LM's, a sampler's) have a text side
        self.text_head: nn.Module | None = None
        if cfg.text_dim > 0 and cfg.text_from == "last":
            self.text_head = nn.Linear(cfg.dim, cfg.text_dim)
        elif cfg.text_dim > 0:
            self.text_head = FeatureDecoder(cfg.code_dim, cfg.text_dim, dim=cfg.dim, heads=cfg.heads, outputs=1)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Continuous (pre-quantisation) query codes ``(B, Q, d)``."""
        return self.to_code(self.qformer(_feature_tokens(features)))

    def text_embedding(self, features: torch.Tensor) -> torch.Tensor:
        """The image in the caption space ``(B, text_dim)``: the text head on the last causal query, or on the
        image's quantised codes (``text_from="codes"``)."""
        if self.text_head is None:
            raise PotpourriError("this tokenizer has no text head; build it with text_dim > 0")
        if self.config.text_from == "codes":
            return self.text_of_tokens(self.tokenize(features))
        return self.text_head(self.qformer(_feature_tokens(features))[:, -1])

    def text_of_tokens(self, indices: torch.Tensor) -> torch.Tensor:
        """Discrete tokens ``(B, Q)`` -> their caption-space embedding ``(B, text_dim)`` (``text_from="codes"``)."""
        if self.text_head is None or self.config.text_from != "codes":
            raise PotpourriError("only a tokenizer with text_dim > 0 and text_from='codes' reads text from tokens")
        self._check_tokens(indices)
        return self.text_head(self.quantizer.codebook[indices].detach())[:, 0]

    def _check_tokens(self, indices: torch.Tensor) -> None:
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.config.codebook_size):
            raise PotpourriError(f"image tokens must lie in [0, {self.config.codebook_size}); got "
                                 f"[{int(indices.min())}, {int(indices.max())}]")  # fmt: skip

    def target_of(self, features: torch.Tensor) -> torch.Tensor:
        """What the decoder reconstructs: mean-pooled ``(B, C)`` or the token grid ``(B, N, C)``."""
        tokens = _feature_tokens(features)
        if self.config.target == "pooled":
            return tokens.mean(1)
        if tokens.shape[1] != self.config.num_feature_tokens:
            raise PotpourriError(f"the decoder was built for {self.config.num_feature_tokens} feature tokens, the "
                                 f"features have {tokens.shape[1]}; set num_feature_tokens=h*w")  # fmt: skip
        return tokens

    def decode_codes(self, quantised: torch.Tensor) -> torch.Tensor:
        """Quantised code vectors ``(B, Q, d)`` -> reconstruction (pooled ``(B, C)`` or ``(B, N, C)``)."""
        out = self.decoder(quantised)  # (B, N, C)
        return out[:, 0] if self.config.target == "pooled" else out

    def forward(self, features: torch.Tensor, *, processes: Processes | None = None) -> TokenizerOutput:
        """Losses of a batch; with ``processes`` (``features`` is this process's slice of the global batch) the codebook
        statistics and the MSE's scale are the global batch's, so each loss is a mean over the slice's items."""
        hidden = self.qformer(_feature_tokens(features))  # (B, Q, D)
        z = self.to_code(hidden)  # (B, Q, d)
        quantised, indices, vq_loss = self.quantizer(z, processes=processes)
        reconstruction = self.decode_codes(quantised)
        target = self.target_of(features)
        if processes is None:
            scale = target.pow(2).mean()
        else:  # the mean square of the global batch's targets
            sums = processes.total_over_processes(
                torch.stack([target.detach().pow(2).sum(), target.new_tensor(target.numel())])
            )
            scale = sums[0] / sums[1]
        recon_loss = (1 - F.cosine_similarity(reconstruction, target, dim=-1)).mean() + F.mse_loss(
            reconstruction, target
        ) / scale.clamp(min=1e-8)  # scale-free MSE + cosine
        text = None  # codes: the text head reads the straight-through quantised vectors (gradients reach the encoder)
        if self.text_head is not None and self.config.text_from == "codes":
            text = self.text_head(quantised)[:, 0]
        elif self.text_head is not None:
            text = self.text_head(hidden[:, -1])
        return TokenizerOutput(recon_loss + vq_loss, recon_loss, vq_loss, indices, reconstruction, target, text)

    @torch.no_grad()
    def tokenize(self, features: torch.Tensor) -> torch.Tensor:
        """Frozen features -> discrete image tokens ``(B, Q)`` (code indices in ``[0, K)``)."""
        return self.quantizer.nearest(self.encode(features).flatten(0, 1)).view(-1, self.config.num_queries)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Discrete tokens ``(B, Q)`` -> reconstructed features (pooled ``(B, C)`` or ``(B, N, C)``)."""
        self._check_tokens(indices)
        return self.decode_codes(self.quantizer.codebook[indices])


# ----------------------------------------------------------------------------------------------------------------
# metrics, save/load (training: vlm/tokenizer.py)


def codebook_usage(indices: torch.Tensor, size: int) -> dict[str, float]:
    """Perplexity ``exp(H(p))`` of the code histogram and the fraction of the ``size`` codes used at least once."""
    counts = torch.bincount(indices.flatten(), minlength=size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"perplexity": float(entropy.exp()), "used_fraction": float((counts > 0).double().mean())}


def save_tokenizer(model: SEEDTokenizer, path: str | os.PathLike) -> Path:
    """Write weights (safetensors) and ``<path>.json`` (the config), both atomically."""
    path = Path(path)
    config = asdict(model.config)
    save_bundle(
        path, model.state_dict(), path.with_suffix(".json"), config, tensor_metadata={"config": json.dumps(config)}
    )
    return path


def load_tokenizer(path: str | os.PathLike) -> SEEDTokenizer:
    """Build the tokenizer from ``<path>.json`` and load the weights saved by ``save_tokenizer``."""
    path = Path(path)
    config_path = path.with_suffix(".json")
    meta, state = load_bundle(
        path,
        config_path,
        missing=f"'{config_path}' is missing; pass a tokenizer written by save_tokenizer",
        fix="re-save the tokenizer with save_tokenizer",
    )
    try:
        config = SEEDConfig(**meta)
    except TypeError as exc:
        raise PotpourriError(f"'{config_path}' is not a SEED tokenizer config ({exc}); re-save the tokenizer") from exc
    model = SEEDTokenizer(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise PotpourriError(f"'{path}' does not fit its config '{config_path}'; re-save the tokenizer") from exc
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# LLM side


@dataclass
class ImageVocab:
    """Where the ``<img_k>`` tokens sit in an extended vocabulary: code ``k`` <-> token id ``ids[k]``."""

    ids: list[int]

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Code indices (any shape) -> LM token ids."""
        return torch.tensor(self.ids, device=codes.device)[codes]

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """LM token ids -> code indices; ids that are not image tokens become -1."""
        lookup = torch.full((max(self.ids) + 1,), -1, dtype=torch.long, device=ids.device)
        lookup[torch.tensor(self.ids, device=ids.device)] = torch.arange(len(self.ids), device=ids.device)
        inside = (ids >= 0) & (ids < len(lookup))
        return torch.where(inside, lookup[ids.clamp(0, len(lookup) - 1)], torch.full_like(ids, -1))

    def text(self, codes: torch.Tensor) -> str:
        """One image's codes ``(Q,)`` as the LM-side string ``<img_3><img_17>..``."""
        return "".join(f"<img_{int(k)}>" for k in codes.flatten())


def add_image_tokens(lm: nn.Module, tokenizer: Any, size: int) -> ImageVocab:
    """Add ``<img_0>``..``<img_{size-1}>`` to the tokenizer (special, never split) and resize the LM's embeddings."""
    names = [f"<img_{k}>" for k in range(size)]
    present = [name for name in names if name in tokenizer.get_vocab()]
    if present:
        raise PotpourriError(f"the tokenizer already has image tokens ({present[0]}, ...); extend a fresh tokenizer")
    tokenizer.add_tokens(names, special_tokens=True)
    model = getattr(lm, "lm", lm)  # a potpourri CausalLM wraps the Hugging Face model
    model.resize_token_embeddings(len(tokenizer))
    return ImageVocab(tokenizer.convert_tokens_to_ids(names))


@torch.no_grad()
def retrieve_nearest(model: SEEDTokenizer, indices: torch.Tensor, gallery_features: torch.Tensor) -> torch.Tensor:
    """Decode tokens ``(B, Q)`` -> features, return the index ``(B,)`` of the most cosine-similar gallery image."""
    decoded = model.decode(indices)  # (B, C) or (B, N, C)
    gallery = model.target_of(gallery_features)  # (G, C) or (G, N, C)
    similarity = F.normalize(decoded.flatten(1), dim=1) @ F.normalize(gallery.flatten(1), dim=1).T  # (B, G)
    return similarity.argmax(1)
