"""Kill-and-resume, precision and device of the vision-language loops, all stepping through ``core.training.Trainer``:
``vlm train`` (both stages, through the CLI), the SEED tokenizer, the SEED image writer and the All-Seeing head.

Each job runs in a fresh one-thread process (``tests/resume.py``): uninterrupted, SIGKILLed after a step that is not
a checkpoint step, then resumed; the final weights must be bitwise equal. CUDA tests skip without a GPU.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from potpourri.core.training import TrainOptions
from tests.resume import assert_resumes_bitwise

pytestmark = pytest.mark.one_thread
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY_VLM = ["vlm", "train", "--lm", "tiny", "--encoder", "test_efficientnet", "--random", "--image-size", "64",
            "--n-train", "4", "--n-test", "2", "--kinds", "yesno", "--max-new-tokens", "2",
            "--batch-size", "3"]  # fmt: skip
VLM_ARGS = [*TINY_VLM, "--steps", "2", "--lora-steps", "5", "--checkpoint-every", "2"]  # logs a row at each stage's end


# ---------------------------------------------------------------------------------------------------- jobs
def vlm_job(out: str, resume: bool) -> None:
    """``vlm train`` on a tiny model: stage 1 (2 steps), stage 2 with LoRA dropout (5 steps), checkpoints every 2."""
    from potpourri.cli import main

    assert main([*VLM_ARGS, "--device", "cpu", "--out", out, *(["--resume"] if resume else [])]) == 0


def _tiny_tokenizer():
    from potpourri.models.visual_tokenizer import SEEDConfig, SEEDTokenizer

    torch.manual_seed(0)
    config = SEEDConfig(feature_dim=16, num_queries=4, dim=32, heads=2, layers=1, codebook_size=8, code_dim=8,
                        num_feature_tokens=4, restart_dead=True)  # fmt: skip
    return SEEDTokenizer(config)


def tokenizer_job(out: str, resume: bool, *, options: TrainOptions | None = None) -> list[float]:
    """The SEED tokenizer: batches and dead-code restarts draw from one generator; the codebook EMA and the ring
    buffer of recent outputs are buffers of the model."""
    from potpourri.vlm.tokenizer import TokenizerTrainConfig, train_tokenizer

    model = _tiny_tokenizer()
    features = torch.randn(24, 16, 2, 2, generator=torch.Generator().manual_seed(1))
    cfg = TokenizerTrainConfig(steps=9, batch_size=6, lr=3e-3, restart_every=2, progress=False)
    options = options or TrainOptions(device="cpu", checkpoint_every=3, resume=resume, progress=False)
    history = train_tokenizer(model, features, cfg, options=options, checkpoints=Path(out) / "checkpoints")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/final.safetensors")
    (Path(out) / "history.json").write_text(json.dumps([history.loss, history.restarted]))
    return history.loss


def _writer():
    from potpourri.models.vlm import char_tokenizer, tiny_llama
    from potpourri.vlm.seed import ImageTokenWriter

    tokenizer = char_tokenizer()
    return ImageTokenWriter(tiny_llama(len(tokenizer), seed=0), tokenizer, 8, lora_rank=4)


def writer_job(out: str, resume: bool, *, options: TrainOptions | None = None) -> list[dict]:
    """The SEED image writer: new vocabulary rows + LoRA, two param groups with their own lr, shuffled order."""
    from potpourri.vlm.seed import ImageWriterTrainConfig, train_image_writer

    writer = _writer()
    captions = ["a brick with a scratch", "a moss surface, clean", "a dent", "two holes"]
    codes = torch.tensor([[0, 1, 2, 3], [7, 6, 5, 4], [1, 1, 2, 2], [3, 0, 3, 0]])
    cfg = ImageWriterTrainConfig(steps=7, batch_size=3, warmup_steps=2, log_every=2, progress=False)
    options = options or TrainOptions(device="cpu", checkpoint_every=2, resume=resume, progress=False)
    history = train_image_writer(writer, captions, codes, cfg, options=options, checkpoints=Path(out) / "checkpoints")
    trained = {n: p.detach().contiguous() for n, p in writer.named_parameters() if p.requires_grad}
    save_file(trained, f"{out}/final.safetensors")
    return history


def head_job(out: str, resume: bool, *, options: TrainOptions | None = None) -> list[float]:
    """The All-Seeing region-text head: InfoNCE with a learnable temperature, random batches, cosine lr."""
    from potpourri.models.allseeing import RegionTextHead
    from potpourri.vlm.allseeing import train_head

    torch.manual_seed(0)
    caption_ids = torch.arange(6).repeat_interleave(4)
    text = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)[caption_ids]
    pooled = torch.nn.functional.one_hot(caption_ids, 6).float() + 0.1 * torch.randn(24, 6)
    boxes = torch.rand(24, 4).sort(-1).values
    head = RegionTextHead(6, 16, embed_dim=8, hidden=32)
    options = options or TrainOptions(device="cpu", checkpoint_every=4, resume=resume, progress=False)
    losses = train_head(head, pooled, boxes, text, caption_ids, steps=11, batch_size=8, lr=3e-3, options=options,
                        checkpoints=Path(out) / "checkpoints")  # fmt: skip
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, f"{out}/final.safetensors")
    return losses


# ---------------------------------------------------------------------------------------------------- resume
def _losses(folder: Path) -> list[tuple[str, str, str]]:
    with open(folder / "metrics.csv", newline="") as fh:
        return [(row["stage"], row["step"], row["loss"]) for row in csv.DictReader(fh)]


@pytest.mark.slow
def test_vlm_train_killed_in_stage_2_resumes_bitwise_with_the_same_log(tmp_path) -> None:
    # stage 1 runs its 2 steps and finishes; stage 2 is killed after its step 3 (checkpoint at 2): step 3 is redone
    assert_resumes_bitwise("tests.vlm.test_resume:vlm_job", tmp_path, kill_at=3, outputs=["trainable.safetensors"],
                           checkpoints="state/stage2")  # fmt: skip
    assert _losses(tmp_path / "killed") == _losses(tmp_path / "straight")  # rows after the checkpoint trimmed, redone
    assert [row[:2] for row in _losses(tmp_path / "straight")][-1] == ("2", "5")
    straight, resumed = (json.loads((tmp_path / f / "summary.json").read_text()) for f in ("straight", "killed"))
    assert resumed["model"] == straight["model"]


def test_vlm_train_resume_refuses_a_folder_without_a_run_and_another_setting(tmp_path, capsys) -> None:
    from potpourri.cli import main

    assert main([*VLM_ARGS, "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "--resume needs --out DIR" in capsys.readouterr().err
    (tmp_path / "old" / "state" / "stage1").mkdir(parents=True)
    (tmp_path / "old" / "config.yaml").write_text("steps: 2\n")
    (tmp_path / "old" / "state" / "stage1" / "last.json").write_text('{"step": 2, "tag": "step00000002"}')
    assert main([*VLM_ARGS, "--out", str(tmp_path / "old"), "--resume"]) == 2  # the checkpoint format before Trainer
    assert "written by an older potpourri" in capsys.readouterr().err


@pytest.mark.slow
def test_seed_tokenizer_killed_after_step_5_resumes_bitwise(tmp_path) -> None:
    assert_resumes_bitwise("tests.vlm.test_resume:tokenizer_job", tmp_path, kill_at=5, outputs=["final.safetensors"],
                           checkpoints="checkpoints")  # fmt: skip
    straight, resumed = (json.loads((tmp_path / f / "history.json").read_text()) for f in ("straight", "killed"))
    assert resumed == straight and len(straight[0]) == 9 and straight[1]  # codes were restarted along the way


@pytest.mark.slow
def test_seed_image_writer_killed_after_step_5_resumes_bitwise(tmp_path) -> None:
    assert_resumes_bitwise("tests.vlm.test_resume:writer_job", tmp_path, kill_at=5, outputs=["final.safetensors"],
                           checkpoints="checkpoints")  # fmt: skip


@pytest.mark.slow
def test_all_seeing_head_killed_after_step_6_resumes_bitwise(tmp_path) -> None:
    assert_resumes_bitwise("tests.vlm.test_resume:head_job", tmp_path, kill_at=6, outputs=["final.safetensors"],
                           checkpoints="checkpoints")  # fmt: skip


# ---------------------------------------------------------------------------------------------------- precision
def test_vlm_stage_in_bf16_on_the_cpu_runs_under_autocast(tmp_path) -> None:
    from potpourri.models.vlm import build_vlm
    from potpourri.vlm.train import VLMTrainConfig, train_vlm
    from tests.models.test_vlm import _planted

    torch.manual_seed(0)
    vlm = build_vlm(encoder="test_efficientnet", lm="tiny", pretrained=False)
    seen = []
    vlm.proj.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    features, items = _planted()
    cfg = VLMTrainConfig(steps=4, batch_size=2, log_every=1, progress=False)
    history = train_vlm(vlm, features, items, cfg, options=TrainOptions(device="cpu", precision="bf16", progress=False))
    assert set(seen) == {torch.bfloat16}
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(row["loss"])) for row in history)
    assert vlm.proj.weight.dtype == torch.float32  # autocast computes in bf16; the weights stay fp32


def spy_image_token_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """The dtype of every projected image-token batch the VLM computes from now on (training and answering)."""
    from potpourri.models.vlm import VisionLanguageModel

    seen, original = [], VisionLanguageModel.image_tokens

    def image_tokens(self, features: torch.Tensor) -> torch.Tensor:
        out = original(self, features)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(VisionLanguageModel, "image_tokens", image_tokens)
    return seen


def test_cli_vlm_train_in_bf16_then_eval_in_bf16(tmp_path, capsys, monkeypatch) -> None:
    from potpourri.cli import main

    seen = spy_image_token_dtypes(monkeypatch)
    out = tmp_path / "run"
    common = ["--device", "cpu", "--precision", "bf16"]
    assert main([*TINY_VLM, "--steps", "2", "--out", str(out), *common]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "yesno_acc" in summary["model"] and "device" not in (out / "config.yaml").read_text()
    assert len(seen) > 2 and set(seen) == {torch.bfloat16}  # 2 training steps, then the answers
    seen.clear()
    assert main(["vlm", "eval", "--run", str(out), *common]) == 0
    assert seen and set(seen) == {torch.bfloat16}
    assert main(["vlm", "eval", "--run", str(out), "--device", "cpu"]) == 0
    assert set(seen[-1:]) == {torch.float32}  # the default stays fp32
    assert main(["vlm", "eval", "--run", str(out), "--precision", "fp16", "--device", "cpu"]) == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err


def test_the_small_loops_run_in_bf16_on_the_cpu(tmp_path) -> None:
    options = TrainOptions(device="cpu", precision="bf16", progress=False)
    for job in (tokenizer_job, writer_job, head_job):
        folder = tmp_path / job.__name__
        folder.mkdir()
        result = job(str(folder), False, options=options)
        losses = [row["loss"] for row in result] if isinstance(result[0], dict) else result
        assert torch.isfinite(torch.tensor(losses)).all(), job.__name__


# ---------------------------------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_vlm_train_and_eval_in_each_precision(tmp_path, precision) -> None:
    from potpourri.cli import main

    out = tmp_path / "run"
    assert main([*VLM_ARGS, "--device", "cuda", "--precision", precision, "--out", str(out)]) == 0
    losses = [float(row[2]) for row in _losses(out)]
    assert len(losses) == 2 and torch.isfinite(torch.tensor(losses)).all()  # the end of stage 1 and of stage 2
    assert main([*VLM_ARGS, "--device", "cuda", "--precision", precision, "--out", str(out), "--resume"]) == 0
    assert main(["vlm", "eval", "--run", str(out), "--device", "cuda", "--precision", precision]) == 0


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_small_loops_in_each_precision(tmp_path, precision) -> None:
    options = TrainOptions(device="cuda", precision=precision, progress=False)
    for job in (tokenizer_job, writer_job, head_job):
        folder = tmp_path / job.__name__
        folder.mkdir()
        result = job(str(folder), False, options=options)
        losses = [row["loss"] for row in result] if isinstance(result[0], dict) else result
        assert torch.isfinite(torch.tensor(losses)).all(), job.__name__


@cuda
def test_cuda_chat_answers_on_the_gpu(tmp_path, capsys) -> None:
    from PIL import Image

    from potpourri.app.assistant import Assistant
    from potpourri.cli import main

    out = tmp_path / "run"
    assert main([*TINY_VLM, "--steps", "2", "--out", str(out), "--device", "cuda"]) == 0
    assistant = Assistant(out, device="cuda", precision="bf16")
    assert next(assistant.vlm.parameters()).device.type == "cuda"
    image = torch.randint(0, 256, (40, 60, 3), dtype=torch.uint8).numpy()
    assert isinstance(assistant.ask(image, "[vqa] is there a crack?").answer, str)
    Image.fromarray(image).save(tmp_path / "part.png")
    args = ["chat", str(tmp_path / "part.png"), "--run", str(out), "-q", "[vqa] is there a crack?"]
    assert main([*args, "--device", "cuda", "--precision", "fp16", "--out", str(tmp_path / "chat")]) == 0
