"""SAM-CLIP's teachers from disk, on tiny random models (no weights exist offline): open_clip as teacher B (patch
tokens, text, DPAM), our clip behind the same contract (bit-identical), an official MobileSAM as teacher A end to end,
and the flags' one-line errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError

open_clip = pytest.importorskip("open_clip")

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 4, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


@pytest.fixture(scope="module")
def open_teacher():
    from potpourri.models.open_clip_loader import build_clip_from_config
    from potpourri.segment.clip_teacher import OpenClipTeacher

    torch.manual_seed(0)
    clip = build_clip_from_config(TINY)
    return OpenClipTeacher(clip, open_clip.SimpleTokenizer(context_length=24))


def _by_hand(visual, x: torch.Tensor, blocks: int) -> torch.Tensor:
    """open_clip's image tower from its own modules, through ``blocks`` residual blocks: (B, 1+N, W)."""
    tokens = visual.conv1(x).flatten(2).transpose(1, 2)  # (B, N, W), row-major patches
    cls = visual.class_embedding.expand(len(x), 1, -1)
    tokens = visual.ln_pre(torch.cat([cls, tokens], 1) + visual.positional_embedding)
    for block in visual.transformer.resblocks[:blocks]:
        tokens = block(tokens)
    return tokens


def test_open_clip_patch_tokens_are_every_token_through_ln_post_and_proj(open_teacher):
    visual, x = open_teacher.model.visual, torch.randn(2, 3, 32, 32)
    out = open_teacher.patch_tokens(x, batch=1)
    assert out.shape == (2, 32, 4, 4) and open_teacher.embed_dim == 32 and open_teacher.patch_size == 8
    with torch.no_grad():
        tokens = _by_hand(visual, x, 4)
        patches = visual.ln_post(tokens[:, 1:]) @ visual.proj  # (2, 16, 32)
        assert torch.allclose(visual.ln_post(tokens[:, 0]) @ visual.proj, open_teacher.model.encode_image(x), atol=1e-5)
    torch.testing.assert_close(out[1, :, 2, 3], patches[1, 2 * 4 + 3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, :, 3, 0], patches[0, 3 * 4], atol=1e-5, rtol=1e-5)
    with pytest.raises(PotpourriError, match="takes 32 px"):
        open_teacher.patch_tokens(torch.randn(1, 3, 64, 64))


def test_open_clip_dpam_in_the_last_block_is_v_v_attention_without_the_ffn(open_teacher):
    visual, x = open_teacher.model.visual, torch.randn(2, 3, 32, 32)
    out = open_teacher.patch_tokens(x, dpam_from=4)
    with torch.no_grad():
        before = _by_hand(visual, x, 3)  # (2, 17, 64): the tokens entering block 4
        block = visual.transformer.resblocks[3]
        attn, y = block.attn, block.ln_1(before)
        v = F.linear(y, attn.in_proj_weight[128:], attn.in_proj_bias[128:]).view(2, 17, 4, 16).transpose(1, 2)
        mixed = ((v @ v.transpose(-2, -1)) / 4.0).softmax(-1) @ v  # (2, 4, 17, 16), q = k = v, scale 1/√16
        vv = before + attn.out_proj(mixed.transpose(1, 2).reshape(2, 17, 64))  # the residual, no FFN
        expected = visual.ln_post(vv[:, 1:]) @ visual.proj  # (2, 16, 32)
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, open_teacher.patch_tokens(x), atol=1e-3)
    with pytest.raises(PotpourriError, match="not a block of this 4-block ViT"):
        open_teacher.patch_tokens(x, dpam_from=5)


def test_open_clip_text_is_the_models_encode_text_unit_norm(open_teacher):
    texts = ["a moon surface with no defect", "a moon surface with a crack", "a tissue surface with a hole"]
    out = open_teacher.encode_texts(texts)
    with torch.no_grad():
        expected = open_teacher.model.encode_text(open_clip.SimpleTokenizer(context_length=24)(texts))
    assert out.shape == (3, 32)
    torch.testing.assert_close(out, expected / expected.norm(dim=-1, keepdim=True))
    from potpourri.segment.clip_teacher import OpenClipTeacher

    with pytest.raises(PotpourriError, match="open_clip ViT image tower"):
        OpenClipTeacher(torch.nn.Linear(2, 2), open_clip.SimpleTokenizer())


def test_small_clip_teacher_is_bit_identical_to_the_old_calls():
    from potpourri.core.registry import create_model
    from potpourri.segment.clip_teacher import SmallClipTeacher
    from potpourri.segment.sam_clip import teacher_b_patches
    from potpourri.vlm.clip import embed_texts, images_to_tensor

    torch.manual_seed(0)
    clip = create_model("clip_vit_tiny_minilm", vision={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                        "num_heads": 2}, text={"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                        "intermediate_size": 64}, embed_dim=16).eval().requires_grad_(False)  # fmt: skip
    teacher = SmallClipTeacher(clip)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    assert torch.equal(teacher.normalise(images), images_to_tensor(images))  # the old path's input, bit for bit
    for dpam in (None, 2):
        assert torch.equal(teacher.patch_tokens(teacher.normalise(images), dpam_from=dpam),
                           teacher_b_patches(clip, images_to_tensor(images), dpam_from=dpam))  # fmt: skip
    texts = ["a brick surface with a dent", "a brick surface with no defect"]
    assert torch.equal(teacher.encode_texts(texts), embed_texts(clip, texts))
    assert (teacher.embed_dim, teacher.patch_size, teacher.depth, teacher.image_size) == (16, 8, 2, None)


# ----------------------------------------------------------------------------------------------- official SAM
@pytest.fixture(scope="module")
def mobile_sam_checkpoint(tmp_path_factory):
    """A randomly initialised MobileSAM (vit_t) state dict on disk, as mobile_sam.pt is laid out."""
    mobile_sam = pytest.importorskip("mobile_sam")
    torch.manual_seed(0)
    model = mobile_sam.sam_model_registry["vit_t"](checkpoint=None)
    path = tmp_path_factory.mktemp("weights") / "mobile_sam.pt"
    torch.save(model.state_dict(), path)
    return path, model


def test_official_sam_prompts_at_a_small_size_match_an_official_prompt_encoder_built_there(mobile_sam_checkpoint):
    from mobile_sam.modeling import PromptEncoder

    from potpourri.models.sam_official import load_official_sam

    path, reference = mobile_sam_checkpoint
    sam = load_official_sam(path, image_size=64)
    assert (sam.config.image_size, sam.config.prompt_dim, sam.config.variant) == (64, 256, "vit_t")
    torch.testing.assert_close(sam.pixel_mean.flatten() * 255, reference.pixel_mean.flatten())
    native = PromptEncoder(embed_dim=256, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=16)
    native.load_state_dict(reference.prompt_encoder.state_dict())
    points, labels, box = torch.tensor([[[20.0, 41.0]]]), torch.tensor([[1]]), torch.tensor([[3.0, 5.0, 40.0, 60.0]])
    with torch.no_grad():
        for ours, theirs in ((sam.prompt_encoder(points, labels, None, 1), native((points, labels), None, None)),
                             (sam.prompt_encoder(None, None, box, 1), native(None, box, None))):  # fmt: skip
            torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(sam.prompt_encoder.get_dense_pe(), native.get_dense_pe())
        embeddings = sam.image_encoder(torch.randn(2, 3, 64, 64))
    assert embeddings.shape == (2, 256, 4, 4)


def test_official_vit_trunk_is_the_official_encoder_at_its_size_and_runs_at_others():
    modeling = pytest.importorskip("mobile_sam.modeling")
    from potpourri.models.sam_official import OfficialImageEncoder

    torch.manual_seed(0)
    encoder = modeling.ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, out_chans=16,
                                       use_rel_pos=True, global_attn_indexes=(1,), window_size=2).eval()  # fmt: skip
    torch.nn.init.normal_(encoder.pos_embed, std=0.5)  # SAM's init is zeros: make the positions matter
    ours, x = OfficialImageEncoder(encoder).eval(), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), encoder(x))
        assert ours(torch.randn(1, 3, 96, 96)).shape == (1, 16, 6, 6)  # positions resampled to 6×6


@pytest.mark.slow
def test_sam_clip_runs_with_an_official_mobile_sam_and_an_open_clip_teacher(tmp_path, mobile_sam_checkpoint):
    from safetensors.torch import save_file

    from potpourri.models.open_clip_loader import build_clip_from_config
    from potpourri.papers.sam_clip import QUICK, run_sam_clip_language

    torch.manual_seed(1)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    save_file(build_clip_from_config(TINY).state_dict(), tmp_path / "tiny.safetensors")
    cfg = dataclasses.replace(QUICK, sam_weights=str(mobile_sam_checkpoint[0]), clip_arch=str(tmp_path / "tiny.json"),
                              clip_weights=str(tmp_path / "tiny.safetensors"), probe_steps=1, stage2_steps=1,
                              segmenter_steps=1, stage1_steps=0, batch_size=2, dpam_from=3)  # fmt: skip
    run = run_sam_clip_language(cfg, out=tmp_path / "run", progress=False, quick=True)
    summary = json.loads((run.path / "summary.json").read_text())
    teachers = summary["teachers"]
    assert teachers["A"].startswith("official vit_t SAM") and teachers["B"].startswith("open_clip")
    rows = summary["rows"]
    assert rows[0]["arm"] == "teacher A (official vit_t SAM)" and 0 <= rows[0]["A: box mIoU"] <= 1
    assert rows[0]["A: embedding nMSE"] == 0.0
    stage1 = next(r for r in rows if r["arm"].startswith("1:"))  # 0 steps: a copy of the official encoder
    assert stage1["A: embedding nMSE"] < 1e-6 and stage1["A: box mIoU"] == pytest.approx(rows[0]["A: box mIoU"])
    assert any("rehearse A" in r["arm"] for r in rows)
    assert "B: patch cosine" in rows[-1] and -1 <= rows[-1]["B: patch cosine"] <= 1


def test_teacher_flags_are_one_line_errors_before_anything_is_written(tmp_path, capsys, mobile_sam_checkpoint):
    from potpourri.cli import main

    out, weights = tmp_path / "run", tmp_path / "w.bin"
    weights.write_bytes(b"x")
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    cases = [
        (["--sam-weights", str(tmp_path / "none.pth")], "does not exist"),
        (["--clip-arch", "ViT-B-16", "--clip-weights", str(tmp_path / "none.bin")], "does not exist"),
        (["--clip-arch", "ViT-B-16"], "needs both --clip-arch ARCH and --clip-weights"),
        (["--clip-arch", "NoSuchNet", "--clip-weights", str(weights)], "unknown open_clip model"),
        (["--clip-arch", "RN50", "--clip-weights", str(weights)], "no ViT image tower"),
        (["--teacher-b", "lite0", "--sam-weights", str(weights)], "apply to --teacher-b clip"),
        (["--sam", str(tmp_path), "--sam-weights", str(weights)], "not both"),
        (["--clip-arch", str(tmp_path / "tiny.json"), "--clip-weights", str(weights), "--teacher-b-dpam", "5"],
         "blocks 1..4"),
    ]  # fmt: skip
    for flags, message in cases:
        assert main(["sam-clip", *flags, "--out", str(out)]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (flags, err)
        assert not out.exists()
