"""MiniGPT-4 (Q-Former + one linear, frozen LM), the random-LM control, the description generator, caption metrics
and the staged runs, on a tiny random LLaMA + the tiny test encoder."""

from __future__ import annotations

import pytest
import torch

from potpourri.cli import main
from potpourri.data.synth import CLASSES, make_samples
from potpourri.models.vlm import MINIGPT4_TEMPLATE, build_vlm, char_tokenizer, tiny_llama
from potpourri.vlm.minigpt import bleu1, description_instructions, detailed_description, rouge_l

pytestmark = pytest.mark.one_thread

PROMPTS = ["is there a crack?", "Describe this image in detail."]
ANSWERS = ["yes", "This is a brick surface with one defect: crack."]


def _minigpt4(**options):
    torch.manual_seed(0)
    return build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False, arch="minigpt4", num_queries=5,
                     qformer_dim=32, qformer_layers=1, qformer_heads=2, **options)  # fmt: skip


def _features() -> torch.Tensor:
    return torch.randn(2, 256, 4, 4, generator=torch.Generator().manual_seed(1))  # test_efficientnet's map


def test_minigpt4_gives_one_token_per_query_in_the_lm_width_and_a_finite_loss() -> None:
    vlm = _minigpt4()
    tokens = vlm.image_tokens(_features())
    assert tokens.shape == (2, 5, vlm.lm.config.hidden_size)
    batch = vlm.build_batch(_features(), PROMPTS, ANSWERS)
    assert batch.image_slots.sum(1).tolist() == [5, 5]
    assert torch.isfinite(vlm(_features(), PROMPTS, ANSWERS))


def test_minigpt4_conversation_template_renders_exactly() -> None:
    vlm = _minigpt4()
    expected = "<|im_start|>###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "
    assert vlm.prompt_text("Describe this image in detail.") == expected
    assert MINIGPT4_TEMPLATE.format("x") == "###Human: x ###Assistant: "


@pytest.mark.parametrize("stage", [1, 2])
def test_minigpt4_trains_only_what_it_declares_and_the_rest_is_bit_identical(stage: int) -> None:
    vlm = _minigpt4()
    vlm.set_stage(stage)
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    qformer = {n for n, _ in vlm.named_parameters() if n.startswith("qformer.")}
    assert qformer and trainable == {"proj.weight", "proj.bias"} | (qformer if stage == 1 else set())
    assert not any(".lora_" in n for n, _ in vlm.named_parameters())  # MiniGPT-4: no LoRA ever
    before = {n: p.detach().clone() for n, p in vlm.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in vlm.parameters() if p.requires_grad], lr=1e-2)
    vlm.train()
    vlm(_features(), PROMPTS, ANSWERS).backward()
    for name, param in vlm.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
    optimizer.step()
    for name, param in vlm.named_parameters():
        assert torch.equal(param, before[name]) != (name in trainable), name


def test_minigpt4_can_keep_a_given_q_former_frozen_in_stage_1_too() -> None:
    vlm = _minigpt4(train_qformer=False)
    vlm.set_stage(1)
    assert {n for n, p in vlm.named_parameters() if p.requires_grad} == {"proj.weight", "proj.bias"}


def test_minigpt4_saves_its_q_former_after_stage_2_and_reloads_exactly(tmp_path) -> None:
    vlm = _minigpt4()
    vlm.set_stage(1)
    with torch.no_grad():
        for param in vlm.qformer.parameters():
            param.add_(0.1)  # as if stage 1 had trained it
    vlm.set_stage(2)
    vlm.save_trainable(tmp_path / "t.safetensors")
    fresh = _minigpt4()
    assert not torch.equal(fresh.image_tokens(_features()), vlm.image_tokens(_features()))
    fresh.load_trainable(tmp_path / "t.safetensors")
    own = dict(vlm.named_parameters())
    assert all(torch.equal(p, own[n]) for n, p in fresh.named_parameters())  # Q-Former, projection, LM, encoder
    with torch.no_grad():  # the same function (attention kernels may differ in the last bit between calls)
        torch.testing.assert_close(fresh.image_tokens(_features()), vlm.image_tokens(_features()), rtol=0, atol=1e-5)
    plain = build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False)
    with pytest.raises(Exception, match="arch"):
        plain.load_trainable(tmp_path / "t.safetensors")


def test_random_lm_reinitialises_every_weight_keeping_shapes_and_tokenizer() -> None:
    tokenizer = char_tokenizer()
    lm = tiny_llama(len(tokenizer), seed=3)
    pretrained = {n: p.detach().clone() for n, p in lm.named_parameters()}
    torch.manual_seed(0)
    vlm = build_vlm(encoder="test_efficientnet", lm=lm, tokenizer=tokenizer, pretrained=False, random_lm=True)
    assert vlm.tokenizer is tokenizer and vlm.lm is not lm
    fresh = dict(vlm.lm.named_parameters())
    assert set(fresh) == set(pretrained)
    for name, value in pretrained.items():
        assert fresh[name].shape == value.shape
        if "norm" not in name:  # RMSNorm weights start at 1 in both
            assert not torch.equal(fresh[name], value), name
    assert all(torch.equal(p, pretrained[n]) for n, p in lm.named_parameters())  # the given LM is untouched


def test_detailed_description_counts_names_and_sizes_the_planted_defects() -> None:
    samples = make_samples("brick", "train", 8, seed=0, size=64)
    for sample in samples:
        text = detailed_description(sample)
        visible = [d for d in sample.defects if (sample.mask == CLASSES.index(d.name)).any()]
        assert text.count(". ") + 1 >= 2  # several sentences
        if not visible:
            assert "no defect" in text
            continue
        for defect in visible:
            share = 100 * float((sample.mask == CLASSES.index(defect.name)).mean())
            assert f"{defect.name}, covering about {share:.0f}% of the image: {defect.phrase}." in text
        assert f"defect{'s' if len(visible) > 1 else ''}:" in text
    items = description_instructions(samples, task="vqa", offset=3)
    assert [i.image_index for i in items] == list(range(3, 11)) and all(i.prompt.startswith("[vqa] ") for i in items)


def test_rouge_l_and_bleu1_match_hand_computed_values() -> None:
    # LCS("the cat sat on mat", "the cat is on the mat") = "the cat on mat" = 4; P = 4/5, R = 4/6
    assert rouge_l("the cat sat on mat", "the cat is on the mat") == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    # clipped unigrams: the(1) cat(1) on(1) mat(1) of 5; brevity penalty exp(1 - 6/5)
    assert bleu1("the cat sat on mat", "the cat is on the mat") == pytest.approx(0.8 * torch.tensor(-0.2).exp().item())
    assert rouge_l("", "x") == 0.0 and bleu1("a b", "a b") == 1.0


def test_curriculum_with_minigpt4_and_stage3_without_curriculum_are_one_line_errors(capsys) -> None:
    common = ["vlm", "train", "--lm", "tiny", "--encoder", "test_efficientnet", "--random", "--steps", "1"]
    assert main([*common, "--arch", "minigpt4", "--curriculum"]) == 2
    assert main([*common, "--stage3-steps", "2"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_minigpt4_cli_run_evaluates_after_each_stage_and_reloads(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["vlm", "train", "--lm", "tiny", "--encoder", "test_efficientnet", "--random", "--image-size", "64",
            "--n-train", "4", "--n-test", "2", "--kinds", "yesno", "--max-new-tokens", "2", "--batch-size", "2",
            "--steps", "2", "--lora-steps", "1", "--arch", "minigpt4", "--queries", "3", "--device", "cpu",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["align", "describe"]
    assert summary["stages"][-1]["model"] == summary["model"] and "caption_rouge_l" in summary["model"]
    assert main(["vlm", "eval", str(out), "--device", "cpu"]) == 0  # the saved run rebuilds as MiniGPT-4


@pytest.mark.slow
def test_reproduce_minigpt_v2_quick_gives_every_arm_the_seed_the_same_step_budget_and_an_eval_per_stage(
    tmp_path,
) -> None:
    import json

    assert (
        main(["reproduce", "minigpt-v2", "--quick", "--seed", "3", "--out", str(tmp_path / "r"), "--device", "cpu"])
        == 0
    )
    arms = json.loads((tmp_path / "r" / "summary.json").read_text())["arms"]
    configs = json.loads((tmp_path / "r" / "arms.json").read_text())
    assert {cfg["seed"] for cfg in configs.values()} == {3}  # --seed reaches every arm's training
    assert [s["name"] for s in arms["curriculum"]["stages"]] == ["broad", "multitask", "instruct"]
    assert [s["name"] for s in arms["two-stage"]["stages"]] == ["projection", "lora"]
    budgets = {name: sum(s["steps"] for s in arm["stages"]) for name, arm in arms.items()}
    assert len(set(budgets.values())) == 1, budgets
    assert arms["curriculum"]["stages"][0]["n_train"] > arms["curriculum"]["stages"][1]["n_train"]  # broad is broader


def test_a_random_lm_run_rebuilds_the_same_random_lm_from_its_config() -> None:
    from potpourri.models.vlm import vlm_from_config

    cfg = {"seed": 4, "encoder": "test_efficientnet", "lm": "tiny", "pretrained": False, "merge": "1x4"}
    real, first, second = (vlm_from_config({**cfg, "random_lm": r}) for r in (False, True, True))
    same = dict(second.lm.named_parameters())
    assert all(torch.equal(p, same[n]) for n, p in first.lm.named_parameters())  # `vlm eval` sees the trained LM
    assert not torch.equal(first.lm.lm_head.weight, real.lm.lm_head.weight)


def test_a_seed_tokenizers_q_former_loads_into_minigpt4_and_stays_frozen(tmp_path) -> None:
    from potpourri.models.visual_tokenizer import SEEDConfig, SEEDTokenizer, save_tokenizer

    torch.manual_seed(5)
    seed = SEEDTokenizer(SEEDConfig(feature_dim=256, num_queries=5, dim=32, heads=2, layers=1, codebook_size=8,
                                    code_dim=8))  # fmt: skip
    save_tokenizer(seed, tmp_path / "seed.safetensors")
    vlm = _minigpt4()
    vlm.load_qformer(tmp_path / "seed.safetensors")
    theirs = seed.qformer.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in vlm.qformer.state_dict().items())
    vlm.set_stage(1)
    assert {n for n, p in vlm.named_parameters() if p.requires_grad} == {"proj.weight", "proj.bias"}
    wider = build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False, arch="minigpt4", num_queries=6,
                      qformer_dim=32, qformer_layers=1, qformer_heads=2)  # fmt: skip
    with pytest.raises(Exception, match="does not fit"):
        wider.load_qformer(tmp_path / "seed.safetensors")


def minigpt4_job(out: str, resume: bool) -> None:
    """``vlm train --arch minigpt4`` on a tiny model: align (2 steps), describe (5 steps), checkpoints every 2."""
    argv = ["vlm", "train", "--lm", "tiny", "--encoder", "test_efficientnet", "--random", "--image-size", "64",
            "--n-train", "4", "--n-test", "2", "--kinds", "yesno", "--max-new-tokens", "2", "--batch-size", "2",
            "--steps", "2", "--lora-steps", "5", "--checkpoint-every", "2", "--arch", "minigpt4", "--queries", "3",
            "--device", "cpu", "--out", out, *(["--resume"] if resume else [])]  # fmt: skip
    assert main(argv) == 0


@pytest.mark.slow
def test_minigpt4_run_killed_in_its_description_stage_resumes_bitwise(tmp_path) -> None:
    from tests.resume import assert_resumes_bitwise

    assert_resumes_bitwise("tests.vlm.test_minigpt:minigpt4_job", tmp_path, kill_at=3,
                           outputs=["trainable.safetensors"], checkpoints="state/describe/stage2")  # fmt: skip


def test_a_phased_run_resumes_only_with_its_own_options(tmp_path, capsys) -> None:
    out = str(tmp_path / "run")
    minigpt4_job(out, resume=False)
    argv = ["vlm", "train", "--lm", "tiny", "--encoder", "test_efficientnet", "--random", "--image-size", "64",
            "--n-train", "4", "--n-test", "2", "--kinds", "yesno", "--max-new-tokens", "2", "--batch-size", "2",
            "--steps", "2", "--lora-steps", "5", "--checkpoint-every", "2", "--arch", "minigpt4", "--queries", "3",
            "--device", "cpu", "--out", out, "--resume"]  # fmt: skip
    before = (tmp_path / "run" / "trainable.safetensors").read_bytes()
    capsys.readouterr()  # the first run's progress bars
    assert main([*argv[:-3], "--lr", "0.5", *argv[-3:]]) == 2
    err = capsys.readouterr().err
    assert "cannot resume with lr=0.5" in err and err.count("\n") == 1
    assert (tmp_path / "run" / "trainable.safetensors").read_bytes() == before  # nothing rewritten
