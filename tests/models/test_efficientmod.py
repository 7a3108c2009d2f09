"""EfficientMod: the modulation formula written out independently, paper parameter counts, timm contract."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from potpourri import create_model
from potpourri.models.efficientmod import ContextModulation, ModulationBlock

# Paper / released-code parameter counts at 1000 classes (M): xxs 4.7, xs 6.6, s 12.9 (recounted 4.74/6.63/12.90).
PAPER_PARAMS = {"efficientmod_xxs": 4.74e6, "efficientmod_xs": 6.63e6, "efficientmod_s": 12.90e6}


def _modulation_by_formula(x: torch.Tensor, m: ContextModulation, r: int) -> torch.Tensor:
    """out = W2 · (act(W1 x + b1) ⊙ tile_r(Wg · GELU(DW7(Wf x + bf)) + bg)) + b2, on (B, C, H, W) input."""
    B, C, H, W = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(-1, C)  # (BHW, C)
    f = pixels @ m.context_in.weight.T + m.context_in.bias
    f_map = f.reshape(B, H, W, C).permute(0, 3, 1, 2)
    dw = F.conv2d(f_map, m.context_conv.weight, m.context_conv.bias, padding=3, groups=C)
    ctx = F.gelu(dw).permute(0, 2, 3, 1).reshape(-1, C) @ m.context_out.weight.T + m.context_out.bias  # (BHW, C)
    value = pixels @ m.value_proj.weight.T + m.value_proj.bias  # (BHW, rC)
    if r > 1:
        value = F.gelu(value)
    tiled = torch.cat([ctx] * r, dim=1)  # channel j of the value meets context channel j mod C
    out = (value * tiled) @ m.out_proj.weight.T + m.out_proj.bias
    return out.reshape(B, H, W, C)


@pytest.mark.parametrize("r", [1, 4, 6])
def test_modulation_matches_the_formula(r: int) -> None:
    torch.manual_seed(r)
    block = ModulationBlock(8, r, layer_scale=0.5)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)  # non-trivial biases, norms and layer scale
    x = torch.randn(2, 8, 5, 6)
    channels_last = x.permute(0, 2, 3, 1)
    normed = F.layer_norm(channels_last, (8,), block.norm.weight, block.norm.bias, block.norm.eps)
    expected = channels_last + block.gamma * _modulation_by_formula(normed.permute(0, 3, 1, 2), block.modulation, r)
    torch.testing.assert_close(block(channels_last), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_within_one_percent_of_the_paper(name: str) -> None:
    params = sum(p.numel() for p in create_model(name).parameters())
    assert abs(params - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01


def test_block_pattern_alternates_pure_and_fused_modulation() -> None:
    model = create_model("efficientmod_xxs")
    stage3 = list(model.stages[2].blocks)
    assert [b.modulation.ratio for b in stage3[:6]] == [1, 6, 1, 6, 1, 6]
    assert type(stage3[-1]).__name__ == "AttentionBlock" and len(stage3) == 7
    assert type(stage3[0].modulation.value_act).__name__ == "Identity"  # no activation when r = 1


def test_timm_contract_and_dense_features() -> None:
    model = timm.create_model("efficientmod_xs", num_classes=3).eval()
    x = torch.randn(1, 3, 96, 128)
    features = model.forward_intermediates(x)
    assert [f.shape[1] for f in features] == [i["num_chs"] for i in model.feature_info]
    assert [x.shape[-1] // f.shape[-1] for f in features] == [i["reduction"] for i in model.feature_info]
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (1, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (1, 7)
