"""Frozen LM block: bidirectional, position-free for every family; frozen yet differentiable; placement; IoU."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel, OPTConfig, OPTModel

from potpourri import PotpourriError, create_model
from potpourri.models.frozen_lm import activation_map, load_lm_layer, pseudo_mask_iou

D = 32  # hidden size of the tiny language models


def tiny_lm(family: str, attn: str) -> nn.Module:
    torch.manual_seed(0)
    common = dict(attn_implementation=attn)
    if family == "bert":
        return BertModel(
            BertConfig(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **common)
        )
    if family == "llama":
        return LlamaModel(
            LlamaConfig(
                hidden_size=D,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=64,
                vocab_size=100,
                **common,
            )
        )
    if family == "opt":
        return OPTModel(
            OPTConfig(
                hidden_size=D,
                num_hidden_layers=2,
                num_attention_heads=4,
                ffn_dim=64,
                word_embed_proj_dim=D,
                vocab_size=100,
                **common,
            )
        )
    return GPT2Model(GPT2Config(n_embd=D, n_layer=2, n_head=4, vocab_size=100, **common))


FAMILIES = ["bert", "llama", "opt", "gpt2"]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_bidirectional_and_position_free(family: str, attn: str) -> None:
    block = load_lm_layer(tiny_lm(family, attn), -1).eval()
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        out = block(x)
        perturbed = x.clone()
        perturbed[:, -1] += 3.0 * torch.randn(D)  # not a constant shift: LayerNorm would cancel that
        # bidirectional: the last token influences the first one (a causal mask would forbid it)
        assert (block(perturbed)[:, 0] - out[:, 0]).abs().max() > 1e-4
        # no positions inside the block: permuting tokens permutes outputs
        order = torch.tensor([3, 0, 5, 1, 4, 2])
        torch.testing.assert_close(block(x[:, order]), out[:, order], rtol=1e-5, atol=1e-5)


def test_the_causal_guard_matters_for_llama_sdpa() -> None:
    """Called the naive way (no mask, default rotary off), the SDPA LLaMA layer is causal; ours is not."""
    model = tiny_lm("llama", "sdpa")
    layer = model.layers[-1]
    x = torch.randn(1, 5, D)
    cos, sin = torch.ones(1, 5, D // 4), torch.zeros(1, 5, D // 4)
    perturbed = x.clone()
    perturbed[:, -1] += 3.0 * torch.randn(D)
    with torch.no_grad():
        naive = layer(x, attention_mask=None, position_embeddings=(cos, sin))
        naive_perturbed = layer(perturbed, attention_mask=None, position_embeddings=(cos, sin))
    torch.testing.assert_close(naive[:, 0], naive_perturbed[:, 0])  # token 0 never saw the last token
    block = load_lm_layer(model, -1)
    with torch.no_grad():
        assert (block(perturbed)[:, 0] - block(x)[:, 0]).abs().max() > 1e-4


def test_minilm_layer_matches_transformers_bert_layer() -> None:
    encoder = create_model("minilm_l6", pretrained=True).eval()
    reference_layer = encoder.bert.encoder.layer[-1]
    x = torch.randn(2, 7, 384)
    with torch.no_grad():
        expected = reference_layer(x)  # BertLayer with no mask: full attention
        expected = expected[0] if isinstance(expected, tuple) else expected
        ours = load_lm_layer("minilm_l6", -1).eval()(x)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_placement_adapters_freezing_and_gradients() -> None:
    torch.manual_seed(0)
    model = create_model("vit_tiny_frozenlm", lm="minilm_l6", num_classes=4, img_size=32, patch_size=8)
    assert model.lm_block.adapter_in.bias is None and model.lm_block.adapter_out.bias is None
    assert model.lm_block.adapter_in.weight.shape == (384, 192) and model.lm_block.adapter_out.weight.shape == (
        192,
        384,
    )
    record: dict[str, torch.Tensor] = {}
    x = torch.randn(3, 3, 32, 32)
    model.forward_tokens(x, record)
    assert list(record) == ["vit", "adapter_in", "lm", "adapter_out"]  # after the last ViT block, in this order
    frozen = {n: p.clone() for n, p in model.named_parameters() if n.startswith("lm_block.lm.")}
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2]))
    loss.backward()
    assert model.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # gradients flow through the frozen block
    optimizer.step()
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_controls_random_trainable_and_mlp() -> None:
    trained = load_lm_layer("minilm_l6", 0, trainable=True)
    assert all(p.requires_grad for p in trained.parameters())
    random_layer = load_lm_layer("minilm_l6", -1, random_init=True)
    pretrained_layer = load_lm_layer("minilm_l6", -1)
    w_random = random_layer.layer.attention.self.query.weight
    assert w_random.shape == pretrained_layer.layer.attention.self.query.weight.shape
    assert not torch.equal(w_random, pretrained_layer.layer.attention.self.query.weight)
    mlp = create_model("vit_tiny_frozenlm", lm="mlp:384", num_classes=2, img_size=32, patch_size=8)
    lm = create_model("vit_tiny_frozenlm", lm="minilm_l6", num_classes=2, img_size=32, patch_size=8)
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (mlp, lm)]
    assert trainable[0] == trainable[1] + 2 * 384  # same adapters; the control adds only its LayerNorm


def test_bad_layer_index_lists_the_range() -> None:
    with pytest.raises(PotpourriError, match=r"has 6 layers \(0\.\.5\)"):
        load_lm_layer("minilm_l6", 6)


def test_pseudo_mask_iou_is_one_when_activation_is_the_mask() -> None:
    masks = torch.zeros(2, 16)
    masks[0, 3:7] = 1
    masks[1, 10:] = 1
    assert torch.equal(pseudo_mask_iou(masks.clone(), masks), torch.ones(2))
    tokens = torch.randn(2, 16, 8) * 0.01
    tokens[masks.bool()] += 5.0  # planted: masked tokens stand out in magnitude
    assert torch.equal(pseudo_mask_iou(activation_map(tokens, "magnitude"), masks), torch.ones(2))
    shifted = torch.roll(masks, 8, dims=1)
    assert (pseudo_mask_iou(shifted, masks) < 0.5).all()


def test_train_everything_strategies_leave_a_frozen_lm_layer_frozen() -> None:
    """`full-adamw` trains every block-map entry, but never the parameters of a layer marked keep_frozen."""
    from potpourri.tune import fit

    torch.manual_seed(0)
    kwargs = dict(lm="minilm_l6", num_classes=2, img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 16, 16), torch.tensor([0, 1] * 4))
    model = create_model("vit_tiny_frozenlm", **kwargs)
    before = {n: p.clone() for n, p in model.named_parameters()}
    fit(model, data, None, "full-adamw", epochs=1, lr=1e-2, batch_size=4, progress=False)
    for name, param in model.named_parameters():
        frozen = name.startswith("lm_block.lm.")
        assert torch.equal(param, before[name]) == frozen, name  # LM unchanged, everything else trained
    trainable = create_model("vit_tiny_frozenlm", lm_trainable=True, **kwargs)
    lm_before = {n: p.clone() for n, p in trainable.named_parameters() if n.startswith("lm_block.lm.")}
    fit(trainable, data, None, "full-adamw", epochs=1, lr=1e-2, batch_size=4, progress=False)
    assert any(not torch.equal(p, lm_before[n]) for n, p in trainable.named_parameters() if n in lm_before)


def test_cls_attention_equals_the_blocks_own_attention_probabilities() -> None:
    from potpourri.models.frozen_lm import cls_attention

    torch.manual_seed(0)
    model = create_model(
        "vit_tiny_frozenlm", lm="none", num_classes=2, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4
    ).eval()
    attn = model.vit.blocks[-1].attn
    attn.fused_attn = False  # the eager path passes the probabilities through attn_drop: capture them there
    captured = []
    attn.attn_drop.register_forward_hook(lambda _m, _i, out: captured.append(out))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model(x)
    expected = captured[0][:, :, 0, 1:].sum(1)  # (B, 16): CLS row, patch columns, summed over heads
    torch.testing.assert_close(cls_attention(model, x), expected)
