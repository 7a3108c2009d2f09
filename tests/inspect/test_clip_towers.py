"""AnomalyCLIP on our own clip (DPAM on a timm ViT, prompts through MiniLM), on tiny random towers, each behaviour
against an independent expectation: timm's own attention, the model's own image and text encoders."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from potpourri import PotpourriError, create_model
from potpourri.inspect.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig, build_towers, train_prompts
from potpourri.inspect.clip_towers import OwnClipTowers
from potpourri.models.dpam import vit_dual_path, vit_vv_attention
from potpourri.vlm.clip import save_small_clip

pytestmark = pytest.mark.one_thread

TINY = {
    "vision": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2},
    "text": {"num_hidden_layers": 3, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64},
    "embed_dim": 16,
}


def tiny_clip(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("clip_vit_tiny_minilm", **TINY).eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_dpam_global_embedding_is_the_unmodified_image_embedding() -> None:
    clip = tiny_clip()
    towers = OwnClipTowers(clip, dual_from=2)
    x = images()
    with torch.no_grad():
        assert torch.equal(towers.frozen_image_features(x)["global"], clip.encode_image(x))


def test_vv_attention_equals_timm_attention_with_q_and_k_replaced_by_v() -> None:
    attn = tiny_clip().visual.blocks[1].attn
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(2))
    reference = copy.deepcopy(attn)
    with torch.no_grad():  # qkv packs [q; k; v] rows: copy v's rows (and bias) over q's and k's
        w, b = reference.qkv.weight, reference.qkv.bias
        w[:32], w[32:64] = w[64:].clone(), w[64:].clone()
        b[:32], b[32:64] = b[64:].clone(), b[64:].clone()
        expected = reference(x)  # timm's own forward (fused scaled-dot-product attention)
        got = vit_vv_attention(attn, x)
    assert torch.allclose(got, expected, atol=1e-6)


def test_taps_before_dual_from_are_the_vanilla_blocks_and_the_vv_stream_skips_the_mlp() -> None:
    clip = tiny_clip()
    vit, x = clip.visual, images(2)
    with torch.no_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        vanilla = [tokens := block(tokens) for block in vit.blocks]
        final, taps = vit_dual_path(vit, x, dual_from=3, layers=(1, 2, 3, 4))
        assert torch.equal(taps[1], vanilla[0]) and torch.equal(taps[2], vanilla[1])
        assert not torch.allclose(taps[3], vanilla[2]) and torch.equal(final, vit.forward_features(x))
        # changing the last block's MLP changes the vanilla output but not the V-V stream's last tap
        vit.blocks[3].mlp.fc2.weight.mul_(3.0)
        final2, taps2 = vit_dual_path(vit, x, dual_from=3, layers=(4,))
    assert torch.equal(taps2[4], taps[4]) and not torch.allclose(final2, final)


def test_learned_prompts_at_placeholder_embeddings_equal_the_encoded_sentence() -> None:
    clip = tiny_clip()
    towers = OwnClipTowers(clip, n_ctx=3, depth=1, deep_length=1)  # depth 1: no deep tokens
    words = clip.text.bert.embeddings.word_embeddings
    ids = towers.prompt_ids
    with torch.no_grad():
        towers.prompts.ctx_normal.copy_(words(ids[0, 1:4]))
        towers.prompts.ctx_anomalous.copy_(words(ids[1, 1:4]))
        expected = clip.encode_texts(["x x x object.", "x x x damaged object."])
    assert torch.allclose(towers.prompt_text_features(), expected, atol=1e-5)
    deep = OwnClipTowers(clip, n_ctx=3, depth=3, deep_length=1)
    with torch.no_grad():
        deep.prompts.ctx_normal.copy_(towers.prompts.ctx_normal)
        deep.prompts.ctx_anomalous.copy_(towers.prompts.ctx_anomalous)
        deep.prompts.deep.normal_()
    assert not torch.allclose(deep.prompt_text_features(), expected, atol=1e-3)  # the deep tokens reach the output


def test_whole_grid_window_is_the_global_embedding() -> None:
    clip = tiny_clip()
    towers = OwnClipTowers(clip)
    x = images(2)
    with torch.no_grad():
        whole = towers.window_embeddings(x, 4)  # the 4x4 grid: one window holding every patch
        assert whole.shape == (2, 1, 1, 16)
        assert torch.allclose(whole[:, 0, 0], clip.encode_image(x), atol=1e-5)
        assert towers.window_embeddings(x, 1).shape == (2, 4, 4, 16)
    with pytest.raises(PotpourriError, match="window scale"):
        towers.window_embeddings(x, 5)


def test_prompt_training_moves_only_the_prompts_and_a_run_folder_builds_the_towers(tmp_path: Path) -> None:
    clip = tiny_clip()
    save_small_clip(clip, tmp_path / "clip", {**TINY, "tuned_text_layers": 0, "text_pretrained": False}, "# c\n")
    towers = build_towers(AnomalyCLIPConfig(towers="own", clip_weights=str(tmp_path / "clip"), n_ctx=4, depth=3))
    assert isinstance(towers, OwnClipTowers) and towers.feature_layers == (2, 3, 4) and towers.dual_from == 2
    before = {k: v.clone() for k, v in towers.clip.state_dict().items()}
    prompts = {k: v.clone() for k, v in towers.prompts.state_dict().items()}
    x = images(4)
    masks = torch.zeros(4, 32, 32)
    masks[2:, 8:16, 8:16] = 1
    train_prompts(towers, x, masks, torch.tensor([0, 0, 1, 1]), epochs=2, batch_size=2)
    assert all(torch.equal(v, towers.clip.state_dict()[k]) for k, v in before.items())
    assert all(not torch.equal(v, towers.prompts.state_dict()[k]) for k, v in prompts.items())
    method = AnomalyCLIP(AnomalyCLIPConfig(towers="own", image_size=32), towers=towers)
    scores, maps = method.score([np.zeros((32, 32, 3), np.uint8)] * 2)
    assert scores.shape == (2,) and maps.shape == (2, 32, 32)
    with pytest.raises(PotpourriError, match="--clip-weights"):
        build_towers(AnomalyCLIPConfig(towers="own"))
    with pytest.raises(PotpourriError, match="dual_from"):
        OwnClipTowers(clip, dual_from=6)


def test_cli_fit_then_predict_on_our_own_clip(tmp_path: Path, mvtec_folder, capsys) -> None:
    import json

    from potpourri.cli import main

    save_small_clip(tiny_clip(), tmp_path / "clip", {**TINY, "tuned_text_layers": 0, "text_pretrained": False}, "#\n")
    run = tmp_path / "run"
    argv = ["inspect", "fit", "--method", "anomalyclip", "--data", str(mvtec_folder), "--out", str(run),
            "--clip", "clip_vit_tiny_minilm", "--clip-weights", str(tmp_path / "clip"), "--aux-data",
            str(mvtec_folder), "--epochs", "1", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["towers"] == "own"
    image = next((mvtec_folder / "test" / "square").iterdir())
    assert main(["inspect", "predict", str(run), str(image), "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "predictions.csv").is_file()
    capsys.readouterr()
    assert main([*argv[:-6], "--clip-weights", str(tmp_path / "absent"), "--aux-data", str(mvtec_folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--clip-weights" in err[0]
