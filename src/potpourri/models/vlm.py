"""A MiniGPT-v2-style vision-language model: frozen visual encoder -> merged tokens -> projection -> causal LM.

As in ``minigpt4/models/minigpt_v2.py``: the encoder's feature map becomes tokens, adjacent tokens are concatenated
(``1x4``: four consecutive tokens of a raster row, MiniGPT-v2's ``view``; ``2x2``: a true spatial block), one trainable
``Linear`` maps them into the LM's embedding space, and the projected tokens replace the ``<ImageHere>`` slot of
``<Img><ImageHere></Img> [task] instruction`` inside the LM's chat template (ChatML for SmolLM2, ``[INST] .. [/INST]``
when the tokenizer has none). The loss is next-token cross-entropy on the answer tokens (and the end token) only.
Stage 1 trains the projection; stage 2 adds LoRA (peft) on the LM's ``q_proj``/``v_proj``.

``arch="minigpt4"`` is MiniGPT-4 instead (``minigpt4/models/mini_gpt4.py``): the encoder's tokens go through a
Q-Former with learned queries (the SEED tokenizer's ``CausalQFormer``), ONE ``Linear`` maps its outputs to the LM,
and the prompt is MiniGPT-4's ``###Human: <Img><ImageHere></Img> .. ###Assistant:``; the LM gets no LoRA. In the
paper the Q-Former is BLIP-2's, pretrained and frozen; here none is pretrained, so it trains with the projection in
stage 1 (``train_qformer``, the default; say so when reporting) unless ``load_qformer`` takes a trained SEED
tokenizer's Q-Former (then frozen throughout, as in the paper); only the projection trains in stage 2.
``random_lm=True`` (``build_vlm``) swaps the LM for a re-initialised one of the same config: the control that shows
what the pretrained language model contributes.

Any Hugging Face causal LM works (``load_causal_lm(folder)``, ``create_model("smollm2_135m", pretrained=True)``);
tests use a tiny random ``LlamaForCausalLM`` with ``char_tokenizer()``.

Example:
    vlm = build_vlm(pretrained=True, merge="1x4")           # EfficientNet-Lite0 + SmolLM2-135M, offline
    vlm.set_stage(1)
    loss = vlm(vlm.encode_images(pixels), ["[vqa] is there a crack?"], ["yes"])
    vlm.generate(vlm.encode_images(pixels), ["[refer] where is the crack?"])
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.io import load_state_dict_file, save_state_dict_atomic

__all__ = [
    "ARCHS",
    "IMAGE_SLOT",
    "MINIGPT4_TEMPLATE",
    "VLMBatch",
    "VLMConfig",
    "VisionLanguageModel",
    "build_lm",
    "build_vlm",
    "char_tokenizer",
    "merge_tokens",
    "reinitialised",
    "token_centres",
    "vlm_from_config",
]

IMAGE_SLOT = "<ImageHere>"
ARCHS = ("minigpt-v2", "minigpt4")
MINIGPT4_TEMPLATE = "###Human: {} ###Assistant: "  # MiniGPT-4's prompt_template (train and chat)
MERGE_BLOCKS = {"none": (1, 1), "1x4": (1, 4), "2x2": (2, 2)}  # (rows, cols) of cells per token
MERGES = {name: rows * cols for name, (rows, cols) in MERGE_BLOCKS.items()}
IGNORE = -100


@dataclass
class VLMConfig:
    """What the trainable parts depend on; saved next to them so they load into the same shapes."""

    merge: str = "1x4"  # none | 1x4 | 2x2
    vision_norm: bool = False  # LayerNorm on the merged tokens before the projection (MiniGPT's ln_vision)
    feature_index: int = -1  # timm ``feature_info`` index of the map that becomes tokens; -1: forward_features
    position: bool = False  # add a trainable map of each token's (x, y) centre: CNN features lack ViT's positions
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    system: str = ""  # the chat template's system turn ("" keeps SmolLM2's default persona out)
    image_template: str = "<Img>" + IMAGE_SLOT + "</Img> "
    arch: str = "minigpt-v2"  # minigpt-v2 | minigpt4
    num_queries: int = 32  # minigpt4: Q-Former queries = image tokens per image (BLIP-2: 32)
    qformer_dim: int = 128
    qformer_layers: int = 2
    qformer_heads: int = 4
    train_qformer: bool = True  # minigpt4: the Q-Former trains in stage 1 (the paper's is pretrained and frozen)


# ----------------------------------------------------------------------------------------------------------------
# blocks


def merge_tokens(features: torch.Tensor, merge: str) -> torch.Tensor:
    """``(B, C, H, W)`` feature map -> ``(B, N, k*C)`` tokens; the map is zero-padded to a multiple of the merge.

    ``1x4``: 4 consecutive raster tokens of one row (channel order ``[x0, x1, x2, x3]``), as MiniGPT-v2's ``view``
    when the row length is a multiple of 4; ``2x2``: a spatial block, channel order ``[(0,0), (0,1), (1,0), (1,1)]``.
    """
    if merge not in MERGES:
        raise PotpourriError(f"unknown token merge '{merge}'; choose from {', '.join(MERGES)}")
    b, c, h, w = features.shape
    if merge == "none":
        return features.flatten(2).transpose(1, 2)  # (B, H*W, C)
    rows, cols = MERGE_BLOCKS[merge]
    pad_h, pad_w = (-h) % rows, (-w) % cols
    x = F.pad(features, (0, pad_w, 0, pad_h))  # (B, C, H', W')
    h, w = h + pad_h, w + pad_w
    x = x.view(b, c, h // rows, rows, w // cols, cols).permute(0, 2, 4, 3, 5, 1)  # (B, H/r, W/c, r, c, C)
    return x.reshape(b, (h // rows) * (w // cols), rows * cols * c)  # (B, N, k*C)


POSITION_FREQUENCIES = 6


def token_centres(h: int, w: int, merge: str) -> torch.Tensor:
    """Centres ``(N, 2)`` as (x, y) in [0, 1] of the tokens ``merge_tokens`` makes from an ``h x w`` map, same order;
    a token that covers padding is centred on its real cells."""
    rows, cols = MERGE_BLOCKS[merge]

    def centres(n: int, k: int) -> torch.Tensor:  # blocks of k cells along a side of n cells, the last one clipped
        start = torch.arange(0, n, k, dtype=torch.float32)
        return (start + torch.clamp(start + k, max=n)) / 2 / n

    grid_y, grid_x = torch.meshgrid(centres(h, rows), centres(w, cols), indexing="ij")
    return torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)


def fourier_features(points: torch.Tensor, frequencies: int = POSITION_FREQUENCIES) -> torch.Tensor:
    """``(N, 2)`` points in [0, 1] -> ``(N, 4 * frequencies)`` sines and cosines at 2^k * pi, k < ``frequencies``."""
    scales = (2.0 ** torch.arange(frequencies, dtype=torch.float32, device=points.device)) * torch.pi  # (F,)
    angles = points[:, :, None] * scales  # (N, 2, F)
    return torch.cat([angles.sin(), angles.cos()], dim=2).flatten(1)  # (N, 4F)


def _as_feature_map(output: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
    """A timm ``forward_features`` output as ``(B, C, H, W)``: CNN maps pass, ViT tokens lose prefixes and fold."""
    if output.ndim == 4:
        return output
    if output.ndim == 3:
        tokens = output[:, getattr(encoder, "num_prefix_tokens", 0) :]  # (B, N, C)
        side = round(tokens.shape[1] ** 0.5)
        if side * side != tokens.shape[1]:
            raise PotpourriError(f"encoder gives {tokens.shape[1]} tokens, not a square grid; use a CNN or square ViT")
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)
    raise PotpourriError(f"encoder output of shape {tuple(output.shape)} is neither a feature map nor tokens")


def token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def cache_kwarg(lm: nn.Module) -> str:
    """The KV-cache keyword of this transformers version (``cache`` from 5.24, ``past_key_values`` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def new_cache(lm: nn.Module) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=lm.config)
    except TypeError:  # older transformers
        return DynamicCache()


@dataclass
class VLMBatch:
    """Spliced LM inputs: embeddings, attention mask, labels (-100 off the answer) and where the image sits."""

    embeds: torch.Tensor  # (B, T, D)
    attention_mask: torch.Tensor  # (B, T) 1 = real token
    labels: torch.Tensor  # (B, T) token id on answer positions, -100 elsewhere
    image_slots: torch.Tensor  # (B, T) bool, True where projected image tokens sit
    input_ids: torch.Tensor  # (B, T) text token ids, -1 on image slots and padding


# ----------------------------------------------------------------------------------------------------------------
# model


class VisionLanguageModel(nn.Module):
    """Frozen encoder + token merge + trainable projection + causal LM (LoRA on q/v in stage 2)."""

    def __init__(self, encoder: nn.Module, lm: nn.Module, tokenizer: Any, *, config: VLMConfig | None = None) -> None:
        super().__init__()
        self.config = config or VLMConfig()
        self.encoder = encoder.eval().requires_grad_(False)
        self.lm = getattr(lm, "lm", lm)  # a potpourri CausalLM wraps the Hugging Face model
        self.lm.requires_grad_(False)
        self.tokenizer = tokenizer
        if getattr(tokenizer, "eos_token_id", None) is None:
            raise PotpourriError("the tokenizer has no end-of-sequence token; pass a Hugging Face causal-LM tokenizer")
        if self.config.arch not in ARCHS:
            raise PotpourriError(f"unknown VLM architecture '{self.config.arch}'; choose from {', '.join(ARCHS)}")
        feature_dim = self._feature_channels()
        self._check_lora_targets()
        hidden = self.lm.get_input_embeddings().weight.shape[1]
        self.qformer: nn.Module | None = None
        if self.config.arch == "minigpt4":
            from potpourri.models.visual_tokenizer import CausalQFormer

            cfg = self.config
            self.qformer = CausalQFormer(feature_dim, num_queries=cfg.num_queries, dim=cfg.qformer_dim,
                                         heads=cfg.qformer_heads, layers=cfg.qformer_layers)  # fmt: skip
            token_dim, position_dim = cfg.qformer_dim, feature_dim  # positions join the Q-Former's memory tokens
        else:
            token_dim, position_dim = feature_dim * MERGES[self.config.merge], hidden
        # raw Lite0 tokens project to ~80x the norm of the LM's text embeddings; a LayerNorm brings them to scale
        self.vision_norm = nn.LayerNorm(token_dim) if self.config.vision_norm else nn.Identity()
        self.proj = nn.Linear(token_dim, hidden)  # MiniGPT-v2's llama_proj (MiniGPT-4's single linear layer)
        self.position = nn.Linear(4 * POSITION_FREQUENCIES, position_dim) if self.config.position else None
        self.stage = 1
        self.lora = False
        self.set_stage(1)

    def load_qformer(self, path: str | os.PathLike) -> None:
        """MiniGPT-4: take the Q-Former of a SEED tokenizer saved by ``save_tokenizer`` (trained on the same encoder's
        features) and keep it frozen, as the paper keeps BLIP-2's."""
        from potpourri.models.visual_tokenizer import load_tokenizer

        if self.qformer is None:
            raise PotpourriError("a pretrained Q-Former is for arch='minigpt4'; MiniGPT-v2 has none")
        source = load_tokenizer(path).qformer
        own = self.qformer.state_dict()
        state = source.state_dict()
        wrong = [k for k in own if k not in state or state[k].shape != own[k].shape]
        if wrong or len(state) != len(own):
            first = (wrong or ["layers"])[0]
            raise PotpourriError(f"the Q-Former in '{path}' does not fit this model ({first}); build it with"
                                 " the tokenizer's feature_dim, num_queries, dim, heads and layers")  # fmt: skip
        self.qformer.load_state_dict(state)
        self.config.train_qformer = False
        self.set_stage(self.stage)

    def _feature_channels(self) -> int:
        """Channels of the token map: timm's ``num_features`` / ``feature_info``, else one probe forward."""
        index, encoder = self.config.feature_index, self.encoder
        if index < -1:
            raise PotpourriError(f"feature_index {index}: use -1 (final features) or a level 0, 1, ...")
        if index >= 0:
            if not hasattr(encoder, "forward_intermediates"):
                raise PotpourriError(f"encoder {type(encoder).__name__} has no forward_intermediates; use -1")
            info = list(getattr(encoder, "feature_info", []))
            if info and index >= len(info):
                raise PotpourriError(f"feature_index {index} out of range: this encoder has levels 0-{len(info) - 1}")
            if info and "num_chs" in info[index]:
                return int(info[index]["num_chs"])
        elif int(getattr(encoder, "num_features", 0)):
            return int(encoder.num_features)
        size = int((getattr(encoder, "pretrained_cfg", None) or {}).get("input_size", (3, 64, 64))[-1])
        with torch.no_grad():
            return self.encode_images(torch.zeros(1, 3, size, size)).shape[1]

    def _check_lora_targets(self) -> None:
        """Every LoRA target must name some LM module (checked now, not after stage 1)."""
        names = [name for name, _ in self.lm.named_modules()]
        for target in self.config.lora_targets:
            if not any(name == target or name.endswith("." + target) for name in names):
                raise PotpourriError(f"LoRA target '{target}' is no module of this LM (e.g. q_proj, k_proj, v_proj, "
                                     "o_proj, gate_proj, up_proj, down_proj for LLaMA)")  # fmt: skip

    def train(self, mode: bool = True) -> VisionLanguageModel:
        super().train(mode)
        self.encoder.eval()  # frozen: BatchNorm statistics never move
        return self

    # ---- stages and trainable parts
    def add_lora(self) -> None:
        """Inject LoRA adapters (peft) on the LM's q/v projections; idempotent."""
        if self.lora:
            return
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:
            raise PotpourriError("LoRA needs peft: pip install 'potpourri[vlm]'") from exc
        cfg = self.config
        lora = LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets), bias="none",
        )  # fmt: skip
        inject_adapter_in_model(lora, self.lm)
        self.lora = True

    def set_stage(self, stage: int) -> None:
        """Stage 1: only the projection (and vision norm) trains; stage 2: + LoRA (q/v); everything else frozen.
        MiniGPT-4: stage 1 projection (+ Q-Former when ``train_qformer``), stage 2 the projection alone, no LoRA."""
        if stage not in (1, 2):
            raise PotpourriError(f"unknown training stage {stage}; use 1 (projection) or 2 (projection + LoRA)")
        if self.qformer is not None:
            self.requires_grad_(False)
            for part in (self.proj, self.vision_norm, self.position):
                if part is not None:
                    part.requires_grad_(True)
            self.qformer.requires_grad_(stage == 1 and self.config.train_qformer)
            self.stage = stage
            return
        if stage == 2:
            self.add_lora()
        self.requires_grad_(False)
        self.proj.requires_grad_(True)
        self.vision_norm.requires_grad_(True)
        if self.position is not None:
            self.position.requires_grad_(True)
        if stage == 2:
            for name, param in self.lm.named_parameters():
                param.requires_grad_(".lora_" in name)
        self.stage = stage

    def _saved(self, name: str, param: nn.Parameter) -> bool:
        """Trained now, or trained earlier and not rebuilt from the config (MiniGPT-4's Q-Former)."""
        return param.requires_grad or (self.qformer is not None and name.startswith("qformer."))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that train in the current stage (projection, LoRA factors; MiniGPT-4: + its Q-Former)."""
        return {n: p.detach().clone() for n, p in self.named_parameters() if self._saved(n, p)}

    def save_trainable(self, path: str | os.PathLike) -> Path:
        """Write the trainable parts (safetensors, atomic) with the config they need."""
        meta = {"config": json.dumps(asdict(self.config)), "stage": str(self.stage)}
        save_state_dict_atomic(self.trainable_state_dict(), path, metadata=meta)
        return Path(path)

    def load_trainable(self, path: str | os.PathLike) -> None:
        """Load trainable parts saved by ``save_trainable``; adds LoRA first when the file holds LoRA factors."""
        from safetensors import safe_open

        state = load_state_dict_file(path, fix="pass a file written by `potpourri vlm train`")
        meta: dict[str, str] = {}
        if Path(path).suffix == ".safetensors":
            with safe_open(str(path), "pt") as fh:
                meta = fh.metadata() or {}
        saved = json.loads(meta.get("config", "{}"))
        saved.setdefault("vision_norm", False)  # files written before the options existed
        saved.setdefault("position", False)
        saved.setdefault("feature_index", -1)
        saved.setdefault("arch", "minigpt-v2")
        keys = ("arch", "merge", "feature_index", "vision_norm", "position", "lora_rank", "lora_alpha", "lora_targets")
        if self.config.arch == "minigpt4":
            keys += ("num_queries", "qformer_dim", "qformer_layers", "qformer_heads")
        for key in keys:
            value = tuple(saved[key]) if key == "lora_targets" and key in saved else saved.get(key)
            if key in saved and value != getattr(self.config, key):
                raise PotpourriError(f"'{path}' was trained with {key}={saved[key]}, this model has "
                                     f"{getattr(self.config, key)}; build the model with the same setting")  # fmt: skip
        self.load_trainable_state(state, source=f"'{path}'")

    def load_trainable_state(self, state: dict[str, torch.Tensor], *, source: str = "the state") -> None:
        """Copy trainable parts (``trainable_state_dict``'s keys) in; switches to stage 2 when they hold LoRA."""
        if self.qformer is None:
            self.set_stage(2 if any(".lora_" in k for k in state) else 1)
        own = dict(self.named_parameters())
        expected = {n for n, p in own.items() if self._saved(n, p)}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise PotpourriError(f"{source} does not fit this model (missing {missing[:2]}, unexpected {extra[:2]})")
        with torch.no_grad():
            for name, value in state.items():
                if own[name].shape != value.shape:
                    raise PotpourriError(
                        f"{source}: {name} has shape {tuple(value.shape)}, model {tuple(own[name].shape)}"
                    )
                own[name].copy_(value)

    # ---- image side
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen encoder: normalised ``(B, 3, H, W)`` -> feature map ``(B, C, h, w)`` (cacheable: it never trains)."""
        index = self.config.feature_index
        if index < 0:
            return _as_feature_map(self.encoder.forward_features(pixels), self.encoder)
        maps = self.encoder.forward_intermediates(pixels, indices=[index], intermediates_only=True)
        return _as_feature_map(maps[0], self.encoder)

    def image_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Feature map ``(B, C, h, w)`` -> projected image tokens ``(B, N, D)`` (+ their position when enabled);
        MiniGPT-4: ``(B, num_queries, D)`` from the Q-Former (positions are added to its memory tokens)."""
        if self.qformer is not None:
            memory = features.flatten(2).transpose(1, 2)  # (B, h*w, C)
            if self.position is not None:
                centres = token_centres(features.shape[2], features.shape[3], "none").to(memory.device)
                memory = memory + self.position(fourier_features(centres).to(memory.dtype))[None]
            return self.proj(self.vision_norm(self.qformer(memory)))  # (B, Q, D)
        tokens = self.proj(self.vision_norm(merge_tokens(features, self.config.merge)))  # (B, N, D)
        if self.position is None:
            return tokens
        centres = token_centres(features.shape[2], features.shape[3], self.config.merge).to(tokens.device)
        return tokens + self.position(fourier_features(centres).to(tokens.dtype))[None]  # (B, N, D)

    # ---- text side
    def prompt_text(self, instruction: str) -> str:
        """The full prompt string with one ``<ImageHere>`` slot, in the LM's chat template."""
        user = self.config.image_template + instruction
        if self.config.arch == "minigpt4":
            return (getattr(self.tokenizer, "bos_token", None) or "") + MINIGPT4_TEMPLATE.format(user)
        template = getattr(self.tokenizer, "chat_template", None)
        if template:
            messages = [{"role": "system", "content": self.config.system}, {"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = getattr(self.tokenizer, "bos_token", None) or ""
        return f"{bos}[INST] {user} [/INST] "  # MiniGPT-v2's LLaMA-2 chat form

    def build_batch(
        self, features: torch.Tensor, instructions: list[str], answers: list[str] | None = None, *, pad: str = "right"
    ) -> VLMBatch:
        """Splice image tokens into the tokenised prompts; answers (+ end token) get labels, all else -100."""
        if len(instructions) != features.shape[0] or (answers is not None and len(answers) != len(instructions)):
            raise PotpourriError("give one instruction (and one answer) per image")
        image = self.image_tokens(features)  # (B, N, D)
        embed = self.lm.get_input_embeddings()
        eos = self.tokenizer.eos_token_id
        rows = []
        for b, instruction in enumerate(instructions):
            before, slot, after = self.prompt_text(instruction).partition(IMAGE_SLOT)
            if not slot or IMAGE_SLOT in after:
                raise PotpourriError(f"the prompt needs exactly one {IMAGE_SLOT} slot; got {instruction!r}")
            ids_before, ids_after = token_ids(self.tokenizer, before), token_ids(self.tokenizer, after)
            ids_answer = [*token_ids(self.tokenizer, answers[b]), eos] if answers is not None else []
            rows.append((ids_before, ids_after, ids_answer))
        n_img = image.shape[1]
        lengths = [len(a) + n_img + len(c) + len(d) for a, c, d in rows]
        total = max(lengths)
        device = image.device
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        pad_id = eos if pad_id is None else pad_id
        input_ids = torch.full((len(rows), total), -1, dtype=torch.long, device=device)
        labels = torch.full((len(rows), total), IGNORE, dtype=torch.long, device=device)
        attention = torch.zeros((len(rows), total), dtype=torch.long, device=device)
        slots = torch.zeros((len(rows), total), dtype=torch.bool, device=device)
        pieces = []
        for b, ((ids_before, ids_after, ids_answer), length) in enumerate(zip(rows, lengths, strict=True)):
            start = total - length if pad == "left" else 0
            text_after = ids_after + ids_answer
            before_t = torch.tensor(ids_before, dtype=torch.long, device=device)
            after_t = torch.tensor(text_after, dtype=torch.long, device=device)
            pad_t = torch.full((total - length,), pad_id, dtype=torch.long, device=device)
            img0 = start + len(ids_before)
            text0 = img0 + n_img
            input_ids[b, start:img0] = before_t
            input_ids[b, text0 : text0 + len(text_after)] = after_t
            slots[b, img0:text0] = True
            attention[b, start : start + length] = 1
            if ids_answer:
                answer0 = text0 + len(ids_after)
                labels[b, answer0 : answer0 + len(ids_answer)] = torch.tensor(ids_answer, device=device)
            parts = [embed(before_t), image[b], embed(after_t)]  # (L, D) each
            parts.insert(0 if pad == "left" else len(parts), embed(pad_t))
            pieces.append(torch.cat(parts, dim=0))
        return VLMBatch(torch.stack(pieces), attention, labels, slots, input_ids)  # embeds (B, T, D)

    # ---- training and inference
    def _decoder(self) -> nn.Module:
        return getattr(self.lm, self.lm.base_model_prefix)

    def forward(
        self,
        features: torch.Tensor,
        instructions: list[str],
        answers: list[str],
        *,
        normaliser: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer tokens of the batch; with ``normaliser`` the sum over them
        divided by ``normaliser(count)`` (under torchrun: a token count of the global batch, so slices add up)."""
        batch = self.build_batch(features, instructions, answers)
        position_ids = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
        hidden = self._decoder()(
            inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, position_ids=position_ids
        ).last_hidden_state  # (B, T, D)
        targets = batch.labels[:, 1:]  # position t predicts token t + 1
        keep = targets != IGNORE
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][keep])  # (n_answer_tokens, vocab): only where needed
        if normaliser is not None:
            return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / normaliser(keep.sum().float())
        return F.cross_entropy(logits.float(), targets[keep])

    @torch.no_grad()
    def generate(self, features: torch.Tensor, instructions: list[str], *, max_new_tokens: int = 24) -> list[str]:
        """Greedy answers (left-padded batch, KV cache), decoded without special tokens."""
        batch = self.build_batch(features, instructions, None, pad="left")
        mask = batch.attention_mask
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        eos = self.tokenizer.eos_token_id
        embed = self.lm.get_input_embeddings()
        cache = {cache_kwarg(self.lm): new_cache(self.lm)}  # filled in place by every forward below
        out = self.lm(
            inputs_embeds=batch.embeds, attention_mask=mask, position_ids=position_ids, use_cache=True, **cache
        )
        finished = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        tokens = []
        for _ in range(max_new_tokens):
            next_ids = out.logits[:, -1].argmax(-1)  # (B,)
            next_ids = torch.where(finished, torch.full_like(next_ids, eos), next_ids)
            tokens.append(next_ids)
            finished |= next_ids == eos
            if bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = self.lm(
                inputs_embeds=embed(next_ids[:, None]), attention_mask=mask, position_ids=position_ids,
                use_cache=True, **cache,
            )  # fmt: skip
        answers = []
        for row in torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in instructions]:
            row = row[: row.index(eos)] if eos in row else row
            answers.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return answers


# ----------------------------------------------------------------------------------------------------------------
# builders


def char_tokenizer() -> Any:
    """A character-level Hugging Face tokenizer (printable ASCII + newline, ChatML specials) for tiny test LMs."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + list(string.printable[:95]) + ["\n"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )  # fmt: skip
    tokenizer.chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
        " + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )  # ChatML, as SmolLM2's
    return tokenizer


def tiny_llama(
    vocab_size: int, *, hidden: int = 64, layers: int = 2, seed: int = 0, init_std: float = 0.2
) -> nn.Module:
    """A tiny randomly initialised ``LlamaForCausalLM`` (tests and smoke runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        initializer_range=init_std,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def build_vlm(
    *,
    encoder: str | nn.Module = "efficientnet_lite0",
    lm: str | nn.Module = "smollm2_135m",
    tokenizer: Any = None,
    pretrained: bool = True,
    merge: str = "1x4",
    random_lm: bool = False,
    **config: Any,
) -> VisionLanguageModel:
    """A VLM from names or modules: encoder (a registered/timm name), LM (``smollm2_135m``, ``tiny``, or a folder);
    ``random_lm``: the LM re-initialised (same config and tokenizer), the pretrained-language control.

    Example:
        build_vlm(pretrained=True)                                    # EfficientNet-Lite0 + SmolLM2-135M
        build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False)   # seconds, for smoke tests
    """
    from potpourri.core.registry import create_model

    if isinstance(encoder, str):
        encoder = create_model(encoder, pretrained=pretrained)
    lm, tokenizer = build_lm(lm, tokenizer=tokenizer, pretrained=pretrained)
    if random_lm:
        lm = reinitialised(getattr(lm, "lm", lm))
    return VisionLanguageModel(encoder, lm, tokenizer, config=VLMConfig(merge=merge, **config))


def build_lm(
    lm: str | nn.Module, *, tokenizer: Any = None, pretrained: bool = True, seed: int = 0
) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer from a name (``smollm2_135m``, ``tiny``: a random test LLaMA seeded by ``seed``
    with a character tokenizer, or a folder) or a module; refuses an LM without a tokenizer."""
    if isinstance(lm, str):
        if lm == "tiny":
            tokenizer = tokenizer or char_tokenizer()
            lm = tiny_llama(len(tokenizer), seed=seed)
        elif lm == "smollm2_135m":
            from potpourri.core.registry import create_model

            lm = create_model("smollm2_135m", pretrained=pretrained)
        else:
            from potpourri.models.smollm2 import load_causal_lm

            lm = load_causal_lm(lm)
    if tokenizer is None:
        tokenizer = getattr(lm, "tokenizer", None)
        if tokenizer is None:
            raise PotpourriError("this language model comes without a tokenizer; pass tokenizer=...")
    return lm, tokenizer


def reinitialised(lm: nn.Module) -> nn.Module:
    """A fresh random Hugging Face model of ``lm``'s class and config (its own init; seeded by torch.manual_seed)."""
    config = getattr(lm, "config", None)
    if config is None:
        raise PotpourriError(f"{type(lm).__name__} has no Hugging Face config to re-initialise from")
    return type(lm)(config).eval()


def vlm_from_config(cfg: dict[str, Any]) -> VisionLanguageModel:
    """The (untrained) model a ``potpourri vlm train`` ``config.yaml`` describes (MiniGPT-4 with ``qformer_from``: its
    SEED Q-Former loaded and frozen); seeded, so a ``--random`` encoder is rebuilt bit-identically. Options added
    later fall back to their defaults for older runs."""
    torch.manual_seed(cfg["seed"])
    keys = ("lora_rank", "lora_alpha", "vision_norm", "position", "feature_index", "arch", "num_queries",
            "train_qformer", "random_lm")  # fmt: skip
    options = {k: cfg[k] for k in keys if k in cfg}
    if cfg.get("qformer_from"):
        options["train_qformer"] = False
    if "lora_targets" in cfg:
        options["lora_targets"] = tuple(t.strip() for t in str(cfg["lora_targets"]).split(",") if t.strip())
    vlm = build_vlm(encoder=cfg["encoder"], lm=cfg["lm"], pretrained=cfg["pretrained"], merge=cfg["merge"], **options)
    if cfg.get("qformer_from"):
        vlm.load_qformer(cfg["qformer_from"])
    return vlm


def encoder_transform_stats(encoder: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The encoder's normalisation (mean, std) from its timm ``pretrained_cfg`` (ImageNet's when absent)."""
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
