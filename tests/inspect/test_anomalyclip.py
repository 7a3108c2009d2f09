"""AnomalyCLIP mechanics on a tiny randomly initialised open_clip model (no weights): the paper's invariants."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from potpourri.core.errors import PotpourriError  # noqa: E402
from potpourri.inspect.anomalyclip import (  # noqa: E402
    AnomalyCLIP,
    AnomalyCLIPConfig,
    ClipTowers,
    build_clip_from_config,
    dual_path_image_features,
    load_open_clip,
    train_prompts,
    vv_attention,
    vv_attention_logits,
)
from potpourri.inspect.base import load_method  # noqa: E402

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 4, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
}


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return build_clip_from_config(TINY)


def _towers(clip, **kwargs) -> ClipTowers:
    return ClipTowers(copy.deepcopy(clip), n_ctx=12, depth=3, deep_length=4, **kwargs)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def planted(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise images; odd ones get a bright 8×8 square (one patch) at a seeded place, with its exact mask."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g) * 0.3
    masks = torch.zeros(n, 32, 32)
    for i in range(1, n, 2):
        y, x = (int(v) * 8 for v in torch.randint(0, 4, (2,), generator=g))
        images[i, :, y : y + 8, x : x + 8] = 2.5
        masks[i, y : y + 8, x : x + 8] = 1
    return images, masks, (torch.arange(n) % 2)


def test_global_embedding_after_surgery_equals_vanilla_clip(clip) -> None:
    x = _images(3)
    with torch.no_grad():
        vanilla = clip.encode_image(x)
        for dual_from in (1, 3):
            surgery, _ = dual_path_image_features(clip.visual, x, dual_from=dual_from, layers=(2, 4))
            assert torch.equal(surgery, vanilla)


def test_vv_attention_is_symmetric_and_equals_mha_with_q_and_k_set_to_v(clip) -> None:
    attn = clip.visual.transformer.resblocks[2].attn
    y = _images(2).view(2, 48, 64)[:, :17] * 0.5  # (B, L, W): any token sequence
    logits = vv_attention_logits(attn, y)  # (B, H, L, L)
    assert torch.allclose(logits, logits.transpose(-2, -1), atol=1e-6)
    # control: the ordinary q·k logits are not symmetric, so the check above can fail
    w, h = attn.embed_dim, attn.num_heads
    q = F.linear(y, attn.in_proj_weight[:w], attn.in_proj_bias[:w]).view(2, 17, h, -1).transpose(1, 2)
    k = F.linear(y, attn.in_proj_weight[w : 2 * w], attn.in_proj_bias[w : 2 * w]).view(2, 17, h, -1).transpose(1, 2)
    assert not torch.allclose(q @ k.transpose(-2, -1), (q @ k.transpose(-2, -1)).transpose(-2, -1), atol=1e-3)
    # independent reference: torch's own attention with the q and k projections overwritten by v's
    reference = copy.deepcopy(attn)
    with torch.no_grad():
        reference.in_proj_weight[: 2 * w] = attn.in_proj_weight[2 * w :].repeat(2, 1)
        reference.in_proj_bias[: 2 * w] = attn.in_proj_bias[2 * w :].repeat(2)
        expected = reference(y, y, y, need_weights=False)[0]
        assert torch.allclose(vv_attention(attn, y), expected, atol=1e-5)


def test_maps_from_different_layers_differ_and_earlier_taps_are_not_overwritten(clip) -> None:
    x = _images(2)
    with torch.no_grad():
        _, maps = dual_path_image_features(clip.visual, x, dual_from=1, layers=(1, 2, 3, 4))
        _, alone = dual_path_image_features(clip.visual, x, dual_from=1, layers=(2,))
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(maps[a], maps[b], atol=1e-4), (a + 1, b + 1)
    assert torch.equal(maps[1], alone[0])  # later blocks did not write into layer 2's tokens (repo issue #18/#64)


def test_vv_path_skips_the_ffn(clip) -> None:
    """With one dual block, the V-V tokens equal input + V-V attention, whatever the block's MLP does."""
    x = _images(2)
    broken = copy.deepcopy(clip)
    with torch.no_grad():
        broken.visual.transformer.resblocks[3].mlp.c_proj.weight.mul_(100)
        _, [vv] = dual_path_image_features(clip.visual, x, dual_from=4, layers=(4,))
        _, [vv_broken] = dual_path_image_features(broken.visual, x, dual_from=4, layers=(4,))
    assert torch.allclose(vv, vv_broken, atol=1e-5)


def test_only_prompt_parameters_train(clip) -> None:
    towers = _towers(clip)
    before = {k: v.clone() for k, v in towers.clip.state_dict().items()}
    prompts_before = [p.detach().clone() for p in towers.trainable]
    images, masks, labels = planted(4)
    train_prompts(towers, images, masks, labels, epochs=1, batch_size=4)
    after = towers.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a frozen CLIP tensor changed"
    assert all(p.grad is None for p in towers.clip.parameters())
    changed = [not torch.equal(a, b) for a, b in zip(prompts_before, towers.trainable, strict=True)]
    assert all(changed), "every prompt tensor (ctx normal, ctx anomalous, deep tokens) should move"


def test_deep_tokens_enter_the_text_layers(clip) -> None:
    towers = _towers(clip)
    ids = towers.prompt_ids  # (2, T): [SOT] X*12 object . [EOT] / [SOT] X*12 damaged object . [EOT]
    assert (ids[:, 1:13] == ids[0, 1]).all() and (ids[:, 13] != ids[0, 1]).all()
    assert towers.prompts.deep.shape == (2, 4, 64)  # depth 3: layers 1 and 2 get deep tokens
    towers.prompt_text_features().square().sum().backward()
    deep_grad = towers.prompts.deep.grad
    assert (deep_grad.abs().sum((1, 2)) > 0).all()  # both deep sets reach the output
    assert (deep_grad[:, 3:].abs().sum() > 0) and towers.prompts.ctx_normal.grad[4:].abs().sum() > 0
    base = towers.prompt_text_features().detach()
    with torch.no_grad():
        towers.prompts.ctx_anomalous[4:].add_(1.0)  # overwritten from layer 1 on only at positions 1..4
        after = towers.prompt_text_features()
    assert not torch.equal(base[1], after[1]) and torch.equal(base[0], after[0])  # only the anomalous prompt moves


def test_loss_decreases_on_a_planted_task(clip) -> None:
    towers = _towers(clip)
    images, masks, labels = planted(16)
    history = train_prompts(towers, images, masks, labels, epochs=12, batch_size=8, lr=3e-3)
    assert history[-1]["loss"] < 0.9 * history[0]["loss"], history


def test_fit_save_load_round_trip_from_a_local_checkpoint(clip, tmp_path, mvtec_folder) -> None:
    config_path, weights = _tiny_checkpoint(clip, tmp_path)
    config = AnomalyCLIPConfig(
        towers="open_clip",
        clip_model=config_path,
        clip_weights=weights,
        aux_data=(str(mvtec_folder),),
        epochs=2,
    )
    model = AnomalyCLIP(config).fit([])
    assert model.config.image_size == 32 and model.n_train_images == 6
    scores, maps = model.score([str(p) for p in sorted((mvtec_folder / "test" / "square").iterdir())])
    assert scores.shape == (3,) and maps.shape == (3, 32, 32) and np.all((scores > 0) & (scores < 1))
    model.save(tmp_path / "run")
    again = load_method(tmp_path / "run", expect="anomalyclip")
    scores2, maps2 = again.score([str(p) for p in sorted((mvtec_folder / "test" / "square").iterdir())])
    np.testing.assert_allclose(scores2, scores, atol=1e-6)
    np.testing.assert_allclose(maps2, maps, atol=1e-5)


def test_missing_or_absent_clip_weights_say_how_to_get_them(tmp_path) -> None:
    with pytest.raises(PotpourriError, match="--clip-weights"):
        load_open_clip("ViT-B-16", str(tmp_path / "nope.safetensors"))
    with pytest.raises(PotpourriError, match="--clip-weights"):
        load_open_clip("ViT-B-16", None)
    with pytest.raises(PotpourriError, match="--aux-data"):
        AnomalyCLIP(AnomalyCLIPConfig(), towers=object()).fit([])  # type: ignore[arg-type]


def _tiny_checkpoint(clip, folder) -> tuple[str, str]:
    from safetensors.torch import save_file

    config_path = folder / "tiny.json"
    config_path.write_text(json.dumps(TINY))
    weights = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, weights)
    return str(config_path), str(weights)


@pytest.mark.parametrize("method", ["anomalyclip", "winclip"])
def test_cli_fit_then_predict_with_a_local_clip_checkpoint(clip, tmp_path, mvtec_folder, method, capsys) -> None:
    from potpourri.cli import main

    model, weights = _tiny_checkpoint(clip, tmp_path)
    run = tmp_path / "run"
    argv = ["inspect", "fit", "--method", method, "--data", str(mvtec_folder), "--out", str(run), "--clip", model,
            "--clip-weights", weights, "--aux-data", str(mvtec_folder), "--epochs", "1", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == method and summary["towers"] == "open_clip"
    assert 0.0 <= summary["metrics"]["pixel_auroc"] <= 1.0  # random towers: only the plumbing is checked
    metadata = json.loads((run / "metadata.json").read_text())
    assert metadata["config"]["image_size"] == 32 and metadata["thresholds"]["image"] is not None
    image = next((mvtec_folder / "test" / "square").iterdir())
    assert main(["inspect", "predict", str(run), str(image), "--out", str(tmp_path / "pred")]) == 0
    assert (tmp_path / "pred" / "predictions.csv").is_file()
    missing = ["inspect", "fit", "--method", method, "--data", str(mvtec_folder), "--clip", "ViT-B-16",
               "--clip-weights", str(tmp_path / "absent.bin"), "--aux-data", str(mvtec_folder)]  # fmt: skip
    capsys.readouterr()  # drop the progress bars of the runs above
    assert main(missing) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--clip-weights" in err[0]
