"""The SAM family on ``core.training.Trainer``: the small SAM, SSPrompt and SAM-CLIP's distillation stage resume
bitwise after a SIGKILL, bf16 runs on the CPU, and the CLI flags (--device, --precision, --resume) reach the code.
CUDA tests skip without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from potpourri.cli import main
from potpourri.core.training import TrainOptions
from potpourri.models.sam import Sam, SamConfig
from potpourri.segment.sam import evaluate_sam, run_sam_experiment, train_sam
from potpourri.segment.sam_clip import StageConfig, build_student, train_stage
from potpourri.segment.sam_prompt import PromptConfig, image_embeddings, learn_prompt
from tests.resume import assert_resumes_bitwise

pytestmark = pytest.mark.one_thread
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SIZE = 64  # the tiny stand-in encoder: stride 16 → 4×4 embeddings, masks at 16×16


def tiny_config(**overrides) -> SamConfig:
    tiny = {"backbone": "none", "image_size": SIZE, "prompt_dim": 16, "num_heads": 2, "mlp_dim": 32, "iou_hidden": 16}
    return SamConfig(**(tiny | overrides))


def tiny_sam(seed: int = 0, **overrides) -> Sam:
    torch.manual_seed(seed)
    return Sam(tiny_config(**overrides), backbone=None).eval()


def planted(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images with a bright 24-px square at a random place; the mask is the square."""
    rng = np.random.default_rng(seed)
    images = rng.integers(60, 120, (n, SIZE, SIZE, 3)).astype(np.uint8)
    masks = np.zeros((n, SIZE, SIZE), bool)
    for i in range(n):
        y, x = rng.integers(4, SIZE - 28, 2)
        masks[i, y : y + 24, x : x + 24] = True
        images[i][masks[i]] = (240, 230, 30)
    return images, masks


def tiny_clip_data(n: int = 12) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    teacher = build_student("tiny", sam_dim=8, clip_dim=6, seed=100).eval()
    a, b = torch.randn(n, 3, SIZE, SIZE), torch.randn(n, 3, SIZE, SIZE) * 0.5 + 1
    with torch.no_grad():
        return {"sam": (a, teacher(a)["sam"]), "clip": (b, teacher(b)["clip"])}


def options(resume: bool, **kw) -> TrainOptions:
    return TrainOptions(**({"device": "cpu", "checkpoint_every": 3, "resume": resume, "progress": False} | kw))


# ----------------------------------------------------------------------------------------------- jobs (subprocesses)
def sam_job(out: str, resume: bool) -> None:
    """8 steps of ``train_sam``: all three prompt kinds, NumPy prompt sampling, AdamW and the warm-up schedule."""
    sam = tiny_sam(steps=8, batch_size=3, lr=1e-2)
    images, masks = planted(3)
    losses = train_sam(sam, images, [(i, m) for i, m in enumerate(masks)], options=options(resume),
                       checkpoints=Path(out) / "checkpoints")  # fmt: skip
    save_file({**sam.state_dict(), "losses": torch.tensor(losses)}, f"{out}/final.safetensors")


def prompt_job(out: str, resume: bool) -> None:
    """8 steps of SSPrompt's ``learn_prompt`` (all prompt parameters, torch-generator batches, clicks clamped)."""
    sam = tiny_sam()
    images, masks = planted(6)
    cfg = PromptConfig(steps=8, batch_size=3, coordinate_lr=20.0)  # large click steps: the clamp takes part
    prompt, losses = learn_prompt(sam, image_embeddings(sam, images), masks, cfg, options=options(resume),
                                  checkpoints=Path(out) / "checkpoints")  # fmt: skip
    save_file({**prompt.state_dict(), "losses": torch.tensor(losses)}, f"{out}/final.safetensors")


def clip_job(out: str, resume: bool) -> None:
    """8 steps of a SAM-CLIP stage; 30 : 70 shares of batch 4 vary per batch and the queues refill mid-run."""
    student = build_student("tiny", sam_dim=8, clip_dim=6)
    stage = StageConfig("both", ("backbone", "sam_head", "clip_head"), {"sam": 0.3, "clip": 0.7}, steps=8,
                        batch_size=4)  # fmt: skip
    losses = train_stage(student, tiny_clip_data(), stage, options=options(resume),
                         checkpoints=Path(out) / "checkpoints")  # fmt: skip
    save_file({**student.state_dict(), "losses": torch.tensor(losses)}, f"{out}/final.safetensors")


def sam_run_job(out: str, resume: bool) -> None:
    """The whole ``sam-train`` experiment on tiny DS-Synth (its run folder is ``out/run``)."""
    run_sam_experiment(out=Path(out) / "run", per_category=1, test_per_category=1,
                       config=tiny_config(steps=8, batch_size=2), options=options(resume))  # fmt: skip


# ----------------------------------------------------------------------------------------------- kill and resume
@pytest.mark.slow  # three fresh processes, each importing torch and timm
def test_sam_training_killed_after_step_5_resumes_bitwise(tmp_path):
    assert_resumes_bitwise("tests.segment.test_sam_resume:sam_job", tmp_path, kill_at=5,
                           outputs=["final.safetensors"], checkpoints="checkpoints")  # fmt: skip


@pytest.mark.slow  # three fresh processes, each importing torch and timm
def test_ssprompt_prompt_learning_killed_after_step_5_resumes_bitwise(tmp_path):
    assert_resumes_bitwise("tests.segment.test_sam_resume:prompt_job", tmp_path, kill_at=5,
                           outputs=["final.safetensors"], checkpoints="checkpoints")  # fmt: skip


@pytest.mark.slow  # three fresh processes, each importing torch and timm
def test_sam_clip_stage_killed_after_step_5_resumes_bitwise(tmp_path):
    assert_resumes_bitwise("tests.segment.test_sam_resume:clip_job", tmp_path, kill_at=5,
                           outputs=["final.safetensors"], checkpoints="checkpoints")  # fmt: skip


@pytest.mark.slow
def test_sam_train_run_killed_and_resumed_ends_with_the_same_weights_and_metrics(tmp_path):
    assert_resumes_bitwise("tests.segment.test_sam_resume:sam_run_job", tmp_path, kill_at=5,
                           outputs=["run/sam.safetensors"], checkpoints="run/checkpoints")  # fmt: skip
    straight, resumed = tmp_path / "straight" / "run", tmp_path / "killed" / "run"
    # metrics.csv: the row of step 0 (logged before the kill) is kept once, step 7 follows: one uninterrupted log
    assert (resumed / "metrics.csv").read_text() == (straight / "metrics.csv").read_text()
    assert [line.split(",")[0] for line in (straight / "metrics.csv").read_text().split()] == ["step", "0", "7"]
    assert (
        json.loads((resumed / "summary.json").read_text())["metrics"]
        == json.loads((straight / "summary.json").read_text())["metrics"]
    )


# ----------------------------------------------------------------------------------------------- precision
def _decoder_dtypes(sam: Sam) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    sam.mask_decoder.register_forward_hook(lambda module, args, out: seen.append(out[0].dtype))
    return seen


def test_bf16_on_the_cpu_trains_the_sam_under_autocast():
    sam = tiny_sam(steps=6, batch_size=2)
    seen = _decoder_dtypes(sam)
    images, masks = planted(2)
    losses = train_sam(sam, images, [(0, masks[0]), (1, masks[1])],
                       options=TrainOptions(device="cpu", precision="bf16", progress=False))  # fmt: skip
    assert set(seen) == {torch.bfloat16} and len(seen) == 6
    assert all(np.isfinite(losses)) and next(sam.parameters()).dtype == torch.float32


def test_bf16_on_the_cpu_learns_a_prompt_and_a_distillation_stage_under_autocast():
    sam = tiny_sam()
    seen = _decoder_dtypes(sam)
    images, masks = planted(4)
    prompt, losses = learn_prompt(sam, image_embeddings(sam, images), masks, PromptConfig(steps=4, batch_size=2),
                                  options=TrainOptions(device="cpu", precision="bf16", progress=False))  # fmt: skip
    assert set(seen) == {torch.bfloat16} and all(np.isfinite(losses))
    assert all(p.dtype == torch.float32 for p in prompt.parameters())

    student = build_student("tiny", sam_dim=8, clip_dim=6)
    convs: list[torch.dtype] = []
    student.backbone[0].register_forward_hook(lambda module, args, out: convs.append(out.dtype))
    stage = StageConfig("both", ("backbone", "sam_head", "clip_head"), {"sam": 0.5, "clip": 0.5}, steps=3,
                        batch_size=4)  # fmt: skip
    losses = train_stage(student, tiny_clip_data(), stage,
                         options=TrainOptions(device="cpu", precision="bf16", progress=False))  # fmt: skip
    assert set(convs) == {torch.bfloat16} and len(convs) == 3 and all(np.isfinite(losses))


# ----------------------------------------------------------------------------------------------- CLI
def test_sam_train_resume_needs_a_run_with_checkpoints(tmp_path, capsys):
    assert main(["sam-train", "--resume", "--device", "cpu"]) == 2
    assert "give --out RUN" in capsys.readouterr().err
    assert main(["sam-train", "--resume", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()  # refused before a run folder was made
    assert main(["sam-train", "--device", "cpu", "--precision", "fp16", "--out", str(tmp_path / "r")]) == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err


@pytest.mark.slow
def test_ssprompt_cli_passes_device_precision_and_checkpoints_to_prompt_learning(tmp_path, monkeypatch):
    import potpourri.papers.ssprompt as ssprompt

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["options"])
        return learn_prompt(*args, **kwargs)

    monkeypatch.setattr(ssprompt, "learn_prompt", spy)
    tiny_sam().save(tmp_path / "sam")
    argv = ["ssprompt", "--sam", str(tmp_path / "sam"), "--image-size", str(SIZE), "--steps", "2", "--segmenter-steps",
            "2", "--out", str(tmp_path / "run"), "--device", "cpu", "--precision", "bf16"]  # fmt: skip
    assert main(argv) == 0
    assert seen and all(o.precision == "bf16" and o.device == "cpu" and not o.resume for o in seen)
    folders = sorted((tmp_path / "run" / "checkpoints").glob("prompt-*"))
    assert len(folders) == len(seen) and all(json.loads((f / "last.json").read_text())["step"] == 2 for f in folders)
    first = json.loads((tmp_path / "run" / "summary.json").read_text())["rows"]
    seen.clear()
    assert main([*argv, "--resume"]) == 0  # every prompt is restored from its final checkpoint: same table
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rows"] == first
    assert seen and all(o.resume for o in seen)


def test_annotate_computes_in_the_requested_precision(tmp_path, monkeypatch):
    import potpourri.segment.sam as sam_module

    dtypes = []
    predict = sam_module.predict_mask

    def spy(sam, features, prompt):
        dtypes.append(features.dtype)
        return predict(sam, features, prompt)

    monkeypatch.setattr(sam_module, "predict_mask", spy)
    tiny_sam().save(tmp_path / "run")
    images, _ = planted(1)
    Image.fromarray(images[0]).save(tmp_path / "img.png")
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out = tmp_path / f"{precision}.png"
        rc = main(["annotate", str(tmp_path / "img.png"), "--points", "30,40", "--run", str(tmp_path / "run"),
                   "--out", str(out), "--device", "cpu", "--precision", precision])  # fmt: skip
        assert rc == 0 and dtypes[-1] == dtype
        assert np.asarray(Image.open(out)).shape == (SIZE, SIZE)


# ----------------------------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_trains_the_sam_and_resumes(tmp_path, precision):
    sam = tiny_sam(steps=6, batch_size=2)
    seen = _decoder_dtypes(sam)
    images, masks = planted(2)
    items = [(0, masks[0]), (1, masks[1])]
    cuda_options = TrainOptions(device="cuda", precision=precision, checkpoint_every=2, progress=False)
    losses = train_sam(sam, images, items, options=cuda_options, checkpoints=tmp_path)
    assert sam.pixel_mean.is_cuda and set(seen) == {getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[precision])}
    assert all(np.isfinite(losses))
    again = tiny_sam(steps=6, batch_size=2)
    resumed = train_sam(again, images, items, options=TrainOptions(device="cuda", precision=precision, resume=True,
                        progress=False), checkpoints=tmp_path)  # fmt: skip
    assert resumed == losses and all(torch.equal(v, again.state_dict()[k]) for k, v in sam.state_dict().items())
    scores = evaluate_sam(sam.cpu(), images, items, progress=False, device="cuda", precision=precision)
    assert sam.pixel_mean.is_cuda and 0 <= scores["1 click"] <= 1 and scores["regions"] == 2


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_learns_a_prompt_and_a_distillation_stage(precision):
    sam = tiny_sam()
    images, masks = planted(4)
    cuda_options = TrainOptions(device="cuda", precision=precision, progress=False)
    prompt, losses = learn_prompt(sam, image_embeddings(sam, images), masks, PromptConfig(steps=4, batch_size=2),
                                  options=cuda_options)  # fmt: skip
    assert prompt.anchor_points.is_cuda and all(np.isfinite(losses))
    student = build_student("tiny", sam_dim=8, clip_dim=6)
    stage = StageConfig("both", ("backbone", "sam_head", "clip_head"), {"sam": 0.5, "clip": 0.5}, steps=3,
                        batch_size=4)  # fmt: skip
    losses = train_stage(student, tiny_clip_data(), stage, options=cuda_options)
    assert next(student.parameters()).is_cuda and all(np.isfinite(losses))
    teacher = tiny_sam(prompt_dim=8).to("cuda")  # SAM-CLIP's default student: a copy of teacher A's encoder on the GPU
    copied = build_student("sam", sam_dim=8, clip_dim=6, sam=teacher)
    losses = train_stage(copied, tiny_clip_data(), stage, options=cuda_options)
    assert all(np.isfinite(losses))


@cuda
def test_annotate_on_cuda(tmp_path):
    tiny_sam().save(tmp_path / "run")
    images, _ = planted(1)
    Image.fromarray(images[0]).save(tmp_path / "img.png")
    for precision in ("fp32", "bf16", "fp16"):
        rc = main(["annotate", str(tmp_path / "img.png"), "--points", "30,40", "--run", str(tmp_path / "run"),
                   "--out", str(tmp_path / "m.png"), "--device", "cuda", "--precision", precision])  # fmt: skip
        assert rc == 0
