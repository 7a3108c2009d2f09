"""The MiniGPT-v2-style VLM on a tiny random LLaMA + tiny timm encoder: merge, splice, loss mask, stages, save/load."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from potpourri import PotpourriError
from potpourri.data.instructions import Instruction
from potpourri.models.vlm import (
    IMAGE_SLOT,
    VisionLanguageModel,
    build_vlm,
    char_tokenizer,
    merge_tokens,
    tiny_llama,
    token_centres,
    vlm_from_config,
)
from potpourri.vlm.train import VLMTrainConfig, evaluate_vlm, score, train_vlm, trivial_predictions

PROMPTS = ["[vqa] is there a crack?", "[refer] where is the scratch?", "describe this surface"]
ANSWERS = ["yes", "{<12><3><56><100>}", "a brick surface with no defect"]


pytestmark = pytest.mark.one_thread  # tiny models: one torch thread (tests/conftest.py)


def _vlm(merge: str = "1x4", seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False, merge=merge)


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 256, 4, 4)  # test_efficientnet's map (C=256) at 128 px


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------- merge
def test_1x4_merge_joins_four_consecutive_raster_tokens_like_minigpt_v2_view() -> None:
    x = torch.randn(2, 5, 4, 8)  # (B, C, H, W), rows of 8: the 4-token strips stay inside a row
    merged = merge_tokens(x, "1x4")
    assert merged.shape == (2, 8, 20)
    raster = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
    torch.testing.assert_close(merged, raster.reshape(2, 8, 20), rtol=0, atol=0)  # minigpt_v2.py's view
    row, strip = 1, 1  # token 3 is row 1, columns 4..7
    expected = torch.cat([x[0, :, row, 4 * strip + k] for k in range(4)])
    torch.testing.assert_close(merged[0, 3], expected, rtol=0, atol=0)


def test_2x2_merge_joins_true_spatial_neighbours() -> None:
    x = torch.randn(2, 3, 4, 6)
    merged = merge_tokens(x, "2x2")
    assert merged.shape == (2, 6, 12)  # (4/2) * (6/2) tokens of 4*C
    for i in range(2):
        for j in range(3):
            block = [x[1, :, 2 * i + dy, 2 * j + dx] for dy in (0, 1) for dx in (0, 1)]
            torch.testing.assert_close(merged[1, i * 3 + j], torch.cat(block), rtol=0, atol=0)


def test_merge_pads_odd_maps_and_rejects_unknown_merges() -> None:
    x = torch.randn(1, 2, 3, 5)
    assert merge_tokens(x, "2x2").shape == (1, 2 * 3, 8)
    assert merge_tokens(x, "1x4").shape == (1, 3 * 2, 8)
    assert merge_tokens(x, "none").shape == (1, 15, 2)
    padded = merge_tokens(x, "2x2")[0, 2]  # block (0, 2): columns 4 and 5, column 5 is padding
    torch.testing.assert_close(padded, torch.cat([x[0, :, 0, 4], torch.zeros(2), x[0, :, 1, 4], torch.zeros(2)]))
    with pytest.raises(PotpourriError, match="unknown token merge"):
        merge_tokens(x, "3x3")


# ---------------------------------------------------------------------------------------------------- splice
@pytest.mark.parametrize("pad", ["right", "left"])
def test_image_tokens_occupy_exactly_the_slot_and_text_embeddings_are_unchanged(features, pad: str) -> None:
    vlm = _vlm()
    tok = vlm.tokenizer
    batch = vlm.build_batch(features, PROMPTS, ANSWERS if pad == "right" else None, pad=pad)
    image = vlm.image_tokens(features)  # (B, N, D)
    assert image.shape[1] == 4  # 4x4 map, 1x4 merge
    embed = vlm.lm.get_input_embeddings()
    for b, prompt in enumerate(PROMPTS):
        full = vlm.prompt_text(prompt)
        assert full.count(IMAGE_SLOT) == 1 and "<|im_start|>assistant\n" in full
        before, after = full.split(IMAGE_SLOT)
        n_before, n_after = len(_ids(tok, before)), len(_ids(tok, after))
        n_answer = len(_ids(tok, ANSWERS[b])) + 1 if pad == "right" else 0
        length = n_before + 4 + n_after + n_answer
        start = batch.embeds.shape[1] - length if pad == "left" else 0
        slot = torch.zeros(batch.embeds.shape[1], dtype=torch.bool)
        slot[start + n_before : start + n_before + 4] = True
        assert torch.equal(batch.image_slots[b], slot)
        torch.testing.assert_close(batch.embeds[b, slot], image[b], rtol=0, atol=0)
        real_text = batch.attention_mask[b].bool() & ~slot
        expected_ids = (
            _ids(tok, before) + _ids(tok, after) + ([*_ids(tok, ANSWERS[b]), tok.eos_token_id] if n_answer else [])
        )
        assert batch.input_ids[b, real_text].tolist() == expected_ids
        torch.testing.assert_close(batch.embeds[b, real_text], embed(torch.tensor(expected_ids)), rtol=0, atol=0)
        assert int(batch.attention_mask[b].sum()) == length


def test_prompt_without_chat_template_uses_minigpt_v2_inst_form() -> None:
    tokenizer = char_tokenizer()
    tokenizer.chat_template = None
    vlm = VisionLanguageModel(build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False).encoder,
                              tiny_llama(len(tokenizer)), tokenizer)  # fmt: skip
    assert vlm.prompt_text("[refer] where is the crack?") == (
        "<|im_start|>[INST] <Img><ImageHere></Img> [refer] where is the crack? [/INST] "
    )


# ---------------------------------------------------------------------------------------------------- loss mask
def test_labels_are_the_answer_tokens_and_end_token_only(features) -> None:
    vlm = _vlm()
    tok = vlm.tokenizer
    batch = vlm.build_batch(features, PROMPTS, ANSWERS)
    for b, answer in enumerate(ANSWERS):
        supervised = batch.labels[b] != -100
        expected = [*_ids(tok, answer), tok.eos_token_id]
        assert int(supervised.sum()) == len(answer) + 1  # char tokenizer: one token per character, independent count
        assert batch.labels[b, supervised].tolist() == expected
        last_real = int(batch.attention_mask[b].sum())
        assert supervised.nonzero().flatten().tolist() == list(range(last_real - len(expected), last_real))
        assert not (supervised & batch.image_slots[b]).any()


def test_loss_equals_hugging_face_shifted_cross_entropy_on_the_labels(features) -> None:
    vlm = _vlm()
    batch = vlm.build_batch(features, PROMPTS, ANSWERS)
    position_ids = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
    reference = vlm.lm(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, position_ids=position_ids,
                       labels=batch.labels).loss  # fmt: skip
    torch.testing.assert_close(vlm(features, PROMPTS, ANSWERS), reference, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- stages
def _one_step(vlm: VisionLanguageModel, features: torch.Tensor | None = None) -> None:
    """One AdamW step (weight decay on); without features the frozen encoder runs in training mode too."""
    params = [p for p in vlm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.05)
    vlm.train()
    if features is None:
        features = vlm.encode_images(torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    vlm(features, PROMPTS, ANSWERS).backward()
    optimizer.step()


@pytest.mark.parametrize("stage", [1, 2])
def test_only_the_stage_parameters_train_everything_else_is_bit_identical(stage: int) -> None:
    vlm = _vlm()
    vlm.set_stage(stage)
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    layers = len(vlm.lm.model.layers)
    lora = {f"lm.model.layers.{i}.self_attn.{m}.lora_{ab}.default.weight"
            for i in range(layers) for m in ("q_proj", "v_proj") for ab in "AB"}  # fmt: skip
    assert trainable == {"proj.weight", "proj.bias"} | (lora if stage == 2 else set())
    if stage == 2:  # LoRA starts as a no-op (B = 0) and stays off k/o/MLP
        assert all(".lora_" not in n or "q_proj" in n or "v_proj" in n for n, _ in vlm.named_parameters())
    before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    buffers = {n: b.clone() for n, b in vlm.named_buffers()}
    _one_step(vlm)
    for name, param in vlm.named_parameters():
        if name in trainable:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"{name} changed but is frozen"
    assert all(torch.equal(b, buffers[n]) for n, b in vlm.named_buffers())  # encoder BN statistics included


def test_save_and_load_trainable_parts_round_trip(tmp_path, features) -> None:
    vlm = _vlm()
    vlm.set_stage(2)
    _one_step(vlm, features)
    path = vlm.save_trainable(tmp_path / "trainable.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["trainable.safetensors"]  # atomic: no temp file left
    fresh = _vlm()  # same frozen parts (same seed), a fresh projection, no LoRA yet
    assert not torch.equal(fresh.proj.weight, vlm.proj.weight)
    fresh.load_trainable(path)
    assert fresh.stage == 2
    vlm.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(features, PROMPTS, ANSWERS), vlm(features, PROMPTS, ANSWERS), rtol=0, atol=0)
    with pytest.raises(PotpourriError, match="merge=1x4"):
        _vlm(merge="2x2").load_trainable(path)


def test_vision_norm_makes_image_tokens_scale_free_trains_with_the_projection_and_must_match_on_load(
    tmp_path, features
) -> None:
    torch.manual_seed(0)
    vlm = build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False, vision_norm=True)
    with torch.no_grad():  # LayerNorm: tokens of a feature map scaled by 1000 equal those of the map itself
        torch.testing.assert_close(
            vlm.image_tokens(features * 1000.0), vlm.image_tokens(features), rtol=1e-4, atol=1e-4
        )
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable == {"proj.weight", "proj.bias", "vision_norm.weight", "vision_norm.bias"}
    _one_step(vlm, features)
    path = vlm.save_trainable(tmp_path / "trainable.safetensors")
    torch.manual_seed(0)
    fresh = build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False, vision_norm=True)
    fresh.load_trainable(path)
    assert torch.equal(fresh.vision_norm.weight, vlm.vision_norm.weight)
    with pytest.raises(PotpourriError, match="vision_norm=True"):
        _vlm().load_trainable(path)


@pytest.mark.parametrize(("merge", "h", "w"), [("none", 3, 5), ("1x4", 4, 8), ("2x2", 4, 6), ("1x4", 2, 4)])
def test_token_centres_are_the_mean_cell_centre_of_each_merged_token(merge: str, h: int, w: int) -> None:
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    cells = torch.stack([xs, ys])[None]  # (1, 2, h, w): each cell's own centre as its two channels
    merged = merge_tokens(cells, merge)[0]  # (N, k*2), channel order [cell0 (x, y), cell1 (x, y), ...]
    expected = merged.view(merged.shape[0], -1, 2).mean(dim=1)  # (N, 2): maps divisible by the merge, no padding
    torch.testing.assert_close(token_centres(h, w, merge), expected)


def test_token_centres_of_padded_tokens_sit_on_their_real_cells() -> None:
    centres = token_centres(3, 5, "1x4")  # tokens: columns 0-3 and column 4 (+3 padding), rows 0, 1, 2
    expected = [[2 / 5, y] for y in (0.5 / 3, 1.5 / 3, 2.5 / 3) for _ in range(2)]
    for i, y in enumerate((0.5 / 3, 1.5 / 3, 2.5 / 3)):
        expected[2 * i + 1] = [4.5 / 5, y]
    torch.testing.assert_close(centres, torch.tensor(expected))


def test_bad_lora_targets_and_feature_levels_fail_at_build_time_with_one_line() -> None:
    with pytest.raises(PotpourriError, match="LoRA target 'bogus' is no module"):
        build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False, lora_targets=("q_proj", "bogus"))
    with pytest.raises(PotpourriError, match="feature_index -2"):
        build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False, feature_index=-2)


def test_position_adds_a_trainable_per_token_offset_and_must_match_on_load(tmp_path, features) -> None:
    torch.manual_seed(0)
    vlm = build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False, position=True)
    same = features[:1].mean(dim=(2, 3), keepdim=True).expand(1, -1, 4, 4)  # every cell alike: only position differs
    with torch.no_grad():
        tokens = vlm.image_tokens(same)[0]  # (4, D)
        plain = vlm.proj(merge_tokens(same, "1x4"))[0]
    assert torch.allclose(plain[0], plain[3])  # without the position the four row tokens are identical ...
    assert (tokens[0] - tokens[3]).abs().max() > 1e-3  # ... with it they differ
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable == {"proj.weight", "proj.bias", "position.weight", "position.bias"}
    before = vlm.position.weight.detach().clone()
    _one_step(vlm, features)
    assert not torch.equal(before, vlm.position.weight)
    path = vlm.save_trainable(tmp_path / "trainable.safetensors")
    cfg = {"encoder": "test_efficientnet", "lm": "tiny", "pretrained": False, "merge": "1x4", "seed": 0,
           "position": True}  # fmt: skip
    fresh = vlm_from_config(cfg)
    fresh.load_trainable(path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.image_tokens(features), vlm.image_tokens(features), rtol=0, atol=0)
    with pytest.raises(PotpourriError, match="position=True"):
        vlm_from_config({**cfg, "position": False}).load_trainable(path)


def test_feature_index_takes_an_earlier_level_as_tokens_and_rejects_bad_levels() -> None:
    torch.manual_seed(0)
    vlm = build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False, feature_index=3)
    encoder, info = vlm.encoder, vlm.encoder.feature_info[3]
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the same map by hand: stem, then the blocks up to the level's module
        x = encoder.bn1(encoder.conv_stem(pixels))
        for i in range(int(info["module"].split(".")[1]) + 1):
            x = encoder.blocks[i](x)
    maps = vlm.encode_images(pixels)
    torch.testing.assert_close(maps, x)
    assert maps.shape[1:] == (info["num_chs"], 64 // info["reduction"], 64 // info["reduction"])
    assert vlm.proj.in_features == 4 * info["num_chs"]  # 1x4 merge of this level's channels
    with pytest.raises(PotpourriError, match="out of range"):
        build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False, feature_index=9)


def test_generate_matches_greedy_decoding_without_cache(features) -> None:
    vlm = _vlm()
    torch.nn.init.normal_(vlm.proj.weight, std=0.5)
    answers = vlm.generate(features, PROMPTS, max_new_tokens=6)  # batched, left-padded, KV cache
    tok = vlm.tokenizer
    for b, prompt in enumerate(PROMPTS):
        batch = vlm.build_batch(features[b : b + 1], [prompt])
        embeds, ids = batch.embeds, []
        with torch.no_grad():
            for _ in range(6):
                next_id = int(vlm.lm(inputs_embeds=embeds).logits[0, -1].argmax())
                if next_id == tok.eos_token_id:
                    break
                ids.append(next_id)
                embeds = torch.cat([embeds, vlm.lm.get_input_embeddings()(torch.tensor([[next_id]]))], dim=1)
        assert answers[b] == tok.decode(ids, skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------------- training
def _planted() -> tuple[torch.Tensor, list[Instruction]]:
    """Image A (+pattern) answers 'yes', image B (-pattern) 'no', to the same question."""
    torch.manual_seed(3)
    pattern = torch.randn(1, 256, 4, 4)
    features = torch.cat([pattern, -pattern])
    items = [Instruction("yesno", "vqa", "[vqa] is there a crack?", ans, i, {"class": "crack", "present": ans == "yes"})
             for i, ans in ((0, "yes"), (1, "no"))] * 4  # fmt: skip
    return features, items


def test_planted_task_loss_decreases_and_answers_follow_the_image() -> None:
    vlm = _vlm()
    features, items = _planted()
    common = dict(batch_size=2, warmup_steps=0, log_every=10, progress=False)
    stage1 = train_vlm(vlm, features, items, VLMTrainConfig(stage=1, steps=60, lr=1e-2, **common))
    assert stage1[-1]["loss"] < 0.3 * stage1[0]["loss"]  # the projection alone steers the frozen LM
    stage2 = train_vlm(vlm, features, items, VLMTrainConfig(stage=2, steps=40, lr=1e-2, **common))
    assert stage2[-1]["loss"] < 0.25 * stage1[-1]["loss"]  # LoRA on q/v fits further
    metrics, predictions = evaluate_vlm(vlm, features, items[:2], progress=False)
    assert predictions == ["yes", "no"] and metrics["yesno_acc"] == 1.0
    # a question-only baseline cannot tell the two images apart: it is right on exactly one of them
    assert score(items[:2], trivial_predictions(items, items[:2]))["yesno_acc"] == 0.5


def test_a_run_killed_in_stage_2_resumes_to_the_same_parameters_as_an_uninterrupted_one(tmp_path) -> None:
    features, items = _planted()
    common = dict(batch_size=3, warmup_steps=1, log_every=1, progress=False, checkpoint_every=2)

    def both_stages(vlm: VisionLanguageModel, state, resume: bool = False) -> dict[str, torch.Tensor]:
        for stage, steps in ((1, 3), (2, 5)):
            cfg = VLMTrainConfig(stage=stage, steps=steps, lr=1e-2, **common)
            train_vlm(vlm, features, items, cfg, state_dir=state, resume=resume)
        return vlm.trainable_state_dict()

    straight = both_stages(_vlm(), tmp_path / "straight")
    killed, calls = _vlm(), []
    forward = killed.forward

    def dies_at_the_seventh_step(*args, **kwargs):  # stage 1: 3 steps; stage 2 dies at step 4 (checkpoint: 2)
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    killed.forward = dies_at_the_seventh_step
    with pytest.raises(KeyboardInterrupt):
        both_stages(killed, tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "stage2" / "last.json").read_text())["step"] == 2
    resumed = both_stages(_vlm(), tmp_path / "killed", resume=True)
    assert set(resumed) == set(straight) and any(".lora_" in k for k in resumed)
    for name, value in straight.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0)
    with pytest.raises(PotpourriError, match="state folder"):
        train_vlm(_vlm(), features, items, VLMTrainConfig(steps=1, **common), resume=True)


def test_score_parses_boxes_words_and_lists() -> None:
    size = (100, 100)
    items = [
        Instruction("refer", "refer", "", "", 0, {"class": "crack", "box": (10.0, 10.0, 50.0, 50.0), "size": size}),
        Instruction("refer", "refer", "", "", 0, {"class": "crack", "box": (10.0, 10.0, 50.0, 50.0), "size": size}),
        Instruction("yesno", "vqa", "", "", 0, {"class": "crack", "present": False}),
        Instruction("list", "vqa", "", "", 0, {"classes": ("crack", "hole")}),
        Instruction("caption", "caption", "", "", 0, {"classes": ("crack", "hole")}),
    ]
    predictions = ["{ <12><10><50><52> }", "{<60><60><90><90>}", "No, there is none.", "crack, dent", "a crack"]
    metrics = score(items, predictions)
    assert metrics["refer_acc"] == 0.5 and metrics["refer_format"] == 1.0 and metrics["yesno_acc"] == 1.0
    assert metrics["list_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # tp=crack, fp=dent, fn=hole
    assert metrics["caption_recall"] == 0.5 and metrics["n_refer"] == 2
    assert np.isfinite(list(metrics.values())).all()


def test_cli_train_then_eval_reproduces_the_summary(tmp_path, capsys) -> None:
    from potpourri.cli import main

    out = tmp_path / "run"
    args = ["vlm", "train", "--lm", "tiny", "--encoder", "test_efficientnet", "--random", "--image-size", "64",
            "--n-train", "7", "--n-test", "7", "--steps", "3", "--lora-steps", "2", "--kinds", "yesno,refer",
            "--max-new-tokens", "4", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert {"config.yaml", "metrics.csv", "summary.json", "trainable.safetensors", "predictions.jsonl"} <= {
        p.name for p in out.iterdir()
    }
    trained = (out / "summary.json").read_text()
    assert main(["vlm", "eval", str(out)]) == 0
    assert json.loads(trained)["model"] == json.loads((out / "eval" / "summary.json").read_text())["model"]
    assert "yesno_acc" in capsys.readouterr().out
    assert main(["vlm", "eval", str(tmp_path)]) == 2  # not a run folder: one line, exit 2
    rows = (out / "metrics.csv").read_text()
    assert main([*args, "--resume", "--lr", "0.5"]) == 2  # another setting: refused, the run untouched
    assert "cannot resume with lr=0.5" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # finished: nothing trains again, no row is logged twice
    assert (out / "metrics.csv").read_text() == rows
    assert json.loads((out / "summary.json").read_text())["model"] == json.loads(trained)["model"]
    shutil.rmtree(out / "state")  # a finished run without resumable state (older runs): refused, not retrained
    assert main([*args, "--resume"]) == 2 and "nothing to resume" in capsys.readouterr().err
    assert (out / "metrics.csv").read_text() == rows
