"""A small CLIP-style model we own: a timm ViT image tower and the MiniLM-L6 text tower in one joint space.

After Radford et al., CLIP (ICML 2021, arXiv:2103.00020): two towers, a linear projection each, L2-normalised
embeddings compared with a learned temperature. Here the image tower is a small timm ``VisionTransformer`` (so
AnomalyCLIP's attention surgery applies to it), the text tower is MiniLM-L6 (all-MiniLM-L6-v2) with its first layers
frozen and its last ``tuned_text_layers`` trainable. It is trained by ``potpourri reproduce clip-small`` on DS-Synth
(three surfaces) and the clutter set, not on web data: it knows surfaces, defect words and clutter shapes, nothing
else. There is no downloadable checkpoint; ``weights=RUN`` loads one that a run wrote.

Reading order: ``SmallClip`` (towers → projections → encode_image / encode_text) → the builder → the registered
variant.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.registry import register_model
from potpourri.core.weights import PretrainedCfg

__all__ = ["SmallClip", "clip_vit_tiny_minilm", "load_small_clip"]

CLIP_SMALL_CFG = PretrainedCfg(
    name="clip_vit_tiny_minilm",  # no package or hub id: weights come from a run folder (weights=RUN)
    input_size=(3, 128, 128),
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    crop_pct=1.0,
    num_classes=256,  # the joint embedding
    label_set=None,
    license="ours (trained on DS-Synth from scikit-image photos; MiniLM-L6 Apache-2.0)",
    paper="Radford et al., CLIP, ICML 2021 (arXiv:2103.00020); the towers are trained here",
)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class SmallClip(nn.Module):
    """timm ViT + MiniLM, each followed by a linear map into a shared ``embed_dim`` space; ``forward`` embeds images.

    Example:
        model = create_model("clip_vit_tiny_minilm", weights="runs/reproduce-clip-small/v0")
        sims = F.normalize(model.encode_image(x), dim=-1) @ F.normalize(model.encode_texts(["a crack"]), dim=-1).T
    """

    def __init__(self, visual: nn.Module, text: nn.Module, *, embed_dim: int = 256, tuned_text_layers: int = 0):
        super().__init__()
        layers = text.bert.encoder.layer
        if not 0 <= tuned_text_layers <= len(layers):
            raise PotpourriError(f"tuned_text_layers {tuned_text_layers} must be in 0..{len(layers)}")
        self.visual = visual  # timm VisionTransformer, num_classes=0, class-token pooling
        self.text = text  # MiniLMEncoder
        self.tuned_text_layers = tuned_text_layers
        self.image_projection = nn.Linear(visual.embed_dim, embed_dim, bias=False)
        self.text_projection = nn.Linear(text.num_features, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.embed_dim = self.num_classes = self.num_features = embed_dim
        text.requires_grad_(False)
        for layer in layers[len(layers) - tuned_text_layers :]:
            layer.requires_grad_(True)

    @property
    def frozen_text_layers(self) -> int:
        return len(self.text.bert.encoder.layer) - self.tuned_text_layers

    # -- image -------------------------------------------------------------------------------------------------------
    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's normed tokens (B, 1+N, W) (class token first)."""
        return self.visual.forward_features(images)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (B, D), not normalised."""
        pooled = self.visual.forward_head(self.image_tokens(images), pre_logits=True)  # (B, W)
        return self.image_projection(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)  # (B, D)

    # -- text --------------------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.text.tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def text_trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, 384) entering the first tuned text layer (the frozen part, cacheable)."""
        out = self.text.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[self.frozen_text_layers]

    def text_head(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The tuned text layers on ``text_trunk``'s output, then pooling and projection: (B, D)."""
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.text.bert.encoder.layer[self.frozen_text_layers :]:
            out = layer(hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.project_text(hidden, attention_mask)

    def project_text(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """MiniLM's sentence embedding (masked mean, L2-normalised) of (B, T, 384) hidden states, projected: (B, D)."""
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # (B, 384)
        return self.text_projection(F.normalize(pooled, dim=-1))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text embeddings (B, D) of token ids, not normalised."""
        return self.text_head(self.text_trunk(input_ids, attention_mask), attention_mask)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Text embeddings (N, D) of sentences."""
        return self.encode_text(*self.tokenize(texts))

    # -- saving ------------------------------------------------------------------------------------------------------
    def trained_state(self) -> dict[str, torch.Tensor]:
        """What training may change: everything but the frozen MiniLM layers (those come from MiniLM's package)."""
        frozen = {n for n, p in self.text.named_parameters(prefix="text") if not p.requires_grad}
        return {k: v.detach().contiguous() for k, v in self.state_dict().items() if k not in frozen}


def _build(config: dict[str, Any], *, text_pretrained: bool) -> SmallClip:
    import timm

    from potpourri.core.registry import create_model

    vision = {"dynamic_img_size": True, **config.get("vision", {})}  # any input size (positions resampled)
    visual = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **vision)
    text = create_model("minilm_l6", pretrained=text_pretrained, **config.get("text", {}))
    return SmallClip(
        visual, text, embed_dim=config.get("embed_dim", 256), tuned_text_layers=config.get("tuned_text_layers", 0)
    )


DEFAULT_CONFIG: dict[str, Any] = {
    "vision": {"img_size": 128, "patch_size": 16, "embed_dim": 192, "depth": 6, "num_heads": 3},
    "text": {},
    "embed_dim": 256,
    "tuned_text_layers": 0,
}


def load_small_clip(path: str | Path) -> SmallClip:
    """A trained ``SmallClip`` from a run folder (``config.json`` + ``model.safetensors``) or its weights file."""
    from potpourri.core.io import load_state_dict_file

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = folder / WEIGHTS_FILE if path.is_dir() else path
    if not (folder / CONFIG_FILE).is_file() or not weights.is_file():
        raise PotpourriError(
            f"'{path}' holds no trained clip (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
            "train one with `potpourri reproduce clip-small --out DIR`"
        )
    config = json.loads((folder / CONFIG_FILE).read_text())
    model = _build(config, text_pretrained=config.get("text_pretrained", True))
    state = load_state_dict_file(weights)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        raise PotpourriError(
            f"'{weights}' does not fit its {CONFIG_FILE}: {str(exc).splitlines()[-1].strip()}"
        ) from exc
    frozen = {n for n, p in model.text.named_parameters(prefix="text") if not p.requires_grad}
    bad = sorted(set(missing) - frozen - {k for k in missing if "position_ids" in k}) + sorted(unexpected)
    if bad:
        raise PotpourriError(f"'{weights}' does not fit this clip config: {bad[:4]}; retrain or pass the run's folder")
    return model.eval()


@register_model(pretrained_cfg=CLIP_SMALL_CFG, tags=("clip", "vit", "text", "trained-here"))
def clip_vit_tiny_minilm(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> nn.Module:
    """ViT (6 blocks, 192 wide, patch 16 at 128 px) + MiniLM-L6 in a 256-d joint space; ``weights=RUN`` loads a run.

    ``pretrained=True`` needs ``weights``: no checkpoint ships with potpourri (``potpourri reproduce clip-small``
    trains one). Without weights the ViT is random and MiniLM is random unless ``text_pretrained=True``.
    """
    if weights is not None:
        return load_small_clip(weights)
    if pretrained:
        raise PotpourriError(
            "clip_vit_tiny_minilm has no downloadable weights; train them with "
            "`potpourri reproduce clip-small --out DIR` and pass weights=DIR"
        )
    text_pretrained = bool(kwargs.pop("text_pretrained", False))
    config = {**DEFAULT_CONFIG, **kwargs}
    return _build(config, text_pretrained=text_pretrained)
