"""Kill-and-resume of the segmentation loops (``inspect segment-train``, Defect-Gen-lite's two phases, the one-shot
embeddings): a run SIGKILLed between checkpoints and resumed ends bitwise where an uninterrupted one does; bf16
runs on the CPU; the CLI flags reach the code; CUDA runs (fp16, bf16) skip without a GPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from potpourri.core.errors import PotpourriError
from potpourri.core.training import TrainOptions
from potpourri.segment.defectgen import DefectGenLite
from potpourri.segment.oneshot import DenseFeatureSource, OneShotSegmenter
from potpourri.segment.segmenter import Segmenter, SegmenterConfig
from tests.resume import assert_resumes_bitwise, run_job, tensors_of

pytestmark = pytest.mark.one_thread
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SEG_SIZE = 32


def planted_segmentation(n: int = 5, *, size: int = SEG_SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy grey images with a bright (class 1) and a dark (class 2) square; exact class-id masks."""
    rng = np.random.default_rng(seed)
    images = rng.integers(90, 150, (n, size, size, 3)).astype(np.uint8)
    masks = np.zeros((n, size, size), np.int64)
    for i in range(n):
        for cls, value in ((1, 245), (2, 10)):
            top, left = (int(v) for v in rng.integers(0, size - 8, 2))
            images[i, top : top + 8, left : left + 8] = value
            masks[i, top : top + 8, left : left + 8] = cls
    return images, masks


def write_folder(root: Path, images: np.ndarray, masks: np.ndarray) -> Path:
    """The ``images/`` + ``masks/`` layout that ``segment-train --data`` reads."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{i:03d}.png")
    return root


def seg_config(**overrides) -> SegmenterConfig:
    base = dict(class_names=("background", "bright", "dark"), image_size=SEG_SIZE, pretrained=False, steps=4,
                batch_size=3, encoder="full", seed=0)  # fmt: skip
    return SegmenterConfig(**{**base, **overrides})


def tiny_defectgen(**overrides):
    from tests.segment.test_defectgen import tiny_config

    return tiny_config(**overrides)


# ----------------------------------------------------------------------------------------------- jobs (subprocesses)
def segment_train_job(out: str, resume: bool) -> None:
    """``potpourri inspect segment-train`` on a tiny folder: full encoder, flips, 11 steps, a checkpoint every 3."""
    from potpourri.cli import main

    data = Path(out).parent / "data"
    if not data.is_dir():
        write_folder(data, *planted_segmentation(6))
    argv = ["inspect", "segment-train", "--data", str(data), "--out", out, "--steps", "11", "--image-size",
            str(SEG_SIZE), "--batch-size", "4", "--encoder", "full", "--checkpoint-every", "3", "--test-fraction",
            "0.34", "--device", "cpu"]  # fmt: skip
    assert main(argv + (["--resume"] if resume else [])) == 0


def defectgen_job(out: str, resume: bool) -> None:
    """Defect-Gen-lite, 7 steps per net, checkpoints every 2 in ``checkpoints/global`` and ``checkpoints/local``."""
    from tests.segment.test_defectgen import planted

    images, masks = planted(6)
    gen = DefectGenLite(tiny_defectgen(train_steps=7))
    options = TrainOptions(device="cpu", checkpoint_every=2, resume=resume, progress=False)
    gen.fit(images, masks, options=options, checkpoints=Path(out) / "checkpoints")
    history = torch.tensor([[row["step"], row["loss"]] for row in gen.history], dtype=torch.float64)
    save_file({**gen.state_tensors(), "history": history}, f"{out}/final.safetensors")


def oneshot_job(out: str, resume: bool) -> None:
    """SLiMe embeddings on a planted image (Adam), 9 steps, a checkpoint every 4."""
    from tests.segment.test_oneshot import ColourFeatures, _config, planted_image

    image, mask = planted_image(0)
    model = OneShotSegmenter(_config(steps=9), source=DenseFeatureSource(ColourFeatures(), temperature=0.1))
    options = TrainOptions(device="cpu", checkpoint_every=4, resume=resume, progress=False)
    model.fit([image], [mask], options=options, checkpoints=Path(out) / "checkpoints")
    history = torch.tensor([row["loss"] for row in model.history], dtype=torch.float64)
    save_file({"embeddings": model.embeddings, "history": history}, f"{out}/final.safetensors")


# ----------------------------------------------------------------------------------------------- kill and resume
@pytest.mark.slow
def test_segment_train_killed_after_step_5_then_resumed_writes_the_same_segmenter(tmp_path):
    assert_resumes_bitwise(
        "tests.segment.test_resume:segment_train_job",
        tmp_path,
        kill_at=5,
        outputs=["segmenter.safetensors"],
        checkpoints="checkpoints",
    )
    straight = json.loads((tmp_path / "straight" / "segmenter.json").read_text())["history"]
    resumed = json.loads((tmp_path / "killed" / "segmenter.json").read_text())["history"]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # the log survives the kill too
    assert json.loads((tmp_path / "killed" / "checkpoints" / "last.json").read_text())["step"] == 11


@pytest.mark.slow
def test_defectgen_killed_in_each_phase_then_resumed_ends_bitwise(tmp_path):
    """Killed after global step 5 (checkpoint 4), resumed and killed after local step 3 (checkpoint 2; the global
    phase, resumed from 4, never meets step 3 again), resumed: the same weights and log as one straight run."""
    job = "tests.segment.test_resume:defectgen_job"
    straight = run_job(job, tmp_path / "straight", "fresh", in_process=True)
    assert straight.returncode == 0, straight.stderr[-3000:]
    run = tmp_path / "killed"
    first = run_job(job, run, "fresh", kill_at=5)  # global phase: checkpoints at 2 and 4, killed after 5
    assert first.returncode == -9, first.stderr[-3000:]
    assert json.loads((run / "checkpoints/global/last.json").read_text())["step"] == 4
    assert not (run / "checkpoints/local").exists() and not (run / "final.safetensors").exists()
    second = run_job(job, run, "resume", kill_at=3)
    assert second.returncode == -9, second.stderr[-3000:]
    assert json.loads((run / "checkpoints/global/last.json").read_text())["step"] == 7  # finished
    assert json.loads((run / "checkpoints/local/last.json").read_text())["step"] == 2
    assert not (run / "final.safetensors").exists()
    global_files = sorted(p.name for p in (run / "checkpoints/global").iterdir())
    third = run_job(job, run, "resume")
    assert third.returncode == 0, third.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints/global").iterdir()) == global_files  # restored, not retrained
    expected, got = tensors_of(tmp_path / "straight", ["final.safetensors"]), tensors_of(run, ["final.safetensors"])
    assert set(got) == set(expected)
    assert not [k for k, v in expected.items() if not torch.equal(got[k], v)]


@pytest.mark.slow
def test_oneshot_embeddings_killed_after_step_6_then_resumed_end_bitwise(tmp_path):
    assert_resumes_bitwise(
        "tests.segment.test_resume:oneshot_job",
        tmp_path,
        kill_at=6,
        outputs=["final.safetensors"],
        checkpoints="checkpoints",
    )


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path):
    images, masks = planted_segmentation(3)
    with pytest.raises(PotpourriError, match="no checkpoint to resume"):
        Segmenter(seg_config()).fit(images, masks, options=TrainOptions(resume=True), checkpoints=tmp_path / "c")
    with pytest.raises(PotpourriError, match="no checkpoint to resume"):
        DefectGenLite(tiny_defectgen(train_steps=2)).fit(
            images[:, :16, :16], masks[:, :16, :16], options=TrainOptions(resume=True), checkpoints=tmp_path / "d"
        )


def test_cli_resume_without_a_checkpoint_is_one_line(tmp_path, capsys):
    from potpourri.cli import main

    data = write_folder(tmp_path / "data", *planted_segmentation(4))
    argv = ["inspect", "segment-train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "2",
            "--image-size", str(SEG_SIZE), "--resume"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint to resume" in err[0]
    assert main([*argv[:4], "--steps", "2", "--resume"]) == 2  # no --out: nothing to continue
    assert "--resume needs --out" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- precision, flags
def test_bf16_on_the_cpu_runs_the_segmenter_under_autocast():
    images, masks = planted_segmentation(4)
    seg = Segmenter(seg_config(steps=3))
    seen = []
    seg.net.classifier.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    seg.fit(images, masks, log_every=1, options=TrainOptions(device="cpu", precision="bf16", progress=False))
    assert seen == [torch.bfloat16] * 3
    assert all(np.isfinite(row["loss"]) for row in seg.history) and len(seg.history) == 3
    probs = seg.predict_proba(images[:2], device="cpu", precision="bf16")
    assert seen[-1] == torch.bfloat16 and probs.dtype == np.float32 and np.allclose(probs.sum(1), 1, atol=1e-4)


def test_bf16_on_the_cpu_runs_both_defectgen_nets_and_the_sampler_under_autocast():
    from tests.segment.test_defectgen import planted

    gen = DefectGenLite(tiny_defectgen(train_steps=3))
    seen: dict[str, list] = {"global": [], "local": []}
    for name, net in gen.networks().items():
        net.head.register_forward_hook(lambda module, args, out, name=name: seen[name].append(out.dtype))
    gen.fit(*planted(4), options=TrainOptions(device="cpu", precision="bf16", progress=False))
    assert seen == {"global": [torch.bfloat16] * 3, "local": [torch.bfloat16] * 3}
    assert all(np.isfinite(v) for v in gen.fit_info["final_loss"].values())
    images, masks = gen.sample(2, seed=0, precision="bf16")
    assert images.dtype == np.uint8 and masks.shape == (2, 16, 16) and seen["global"][-1] == torch.bfloat16


def test_bf16_on_the_cpu_runs_the_oneshot_loss_under_autocast():
    from tests.segment.test_oneshot import ColourFeatures, _config, planted_image

    class Recording(DenseFeatureSource):
        dtypes: ClassVar[list] = []

        def attend(self, prepared, tokens, *, train, generator, rows=None):
            maps = super().attend(prepared, tokens, train=train, generator=generator, rows=rows)
            self.dtypes.append(maps.cross_logits.dtype)
            return maps

    source = Recording(ColourFeatures(), temperature=0.1)
    image, mask = planted_image(0)
    model = OneShotSegmenter(_config(steps=4), source=source)
    model.fit([image], [mask], options=TrainOptions(device="cpu", precision="bf16", progress=False))
    assert source.dtypes == [torch.bfloat16] * 4
    assert all(np.isfinite(row["loss"]) for row in model.history)
    assert model.predict([image], precision="bf16").shape == (1, 64, 64)


def test_cli_passes_device_precision_and_resume_to_the_pipelines(monkeypatch, tmp_path):
    import potpourri.segment.pipeline as pipeline
    from potpourri.cli import main

    seen: dict[str, dict] = {}
    for name in ("train_segmenter_run", "predict_segmenter_run", "oneshot_run"):
        monkeypatch.setattr(pipeline, name, lambda name=name, **kw: seen.setdefault(name, kw))
    compute = ["--device", "cpu", "--precision", "bf16"]
    assert main(["inspect", "segment-train", "--data", "x", "--out", "o", "--resume", "--checkpoint-every", "7",
                 *compute]) == 0  # fmt: skip
    assert main(["inspect", "segment-predict", "--run", "r", "img.png", *compute]) == 0
    assert main(["inspect", "oneshot", "img.png", "--support", "s.png", "--support-mask", "m.png", "--out", "o",
                 "--resume", *compute]) == 0  # fmt: skip
    for name, kw in seen.items():
        assert (kw["device"], kw["precision"]) == ("cpu", "bf16"), name
    assert seen["train_segmenter_run"]["resume"] and seen["train_segmenter_run"]["checkpoint_every"] == 7
    assert seen["oneshot_run"]["resume"] and seen["oneshot_run"]["checkpoint_every"] == 50
    assert main(["inspect", "segment-predict", "--run", "r", "img.png", "--precision", "fp16", "--device", "cpu"]) == 2


def test_oneshot_cli_resume_needs_out_and_a_fit(tmp_path, capsys):
    from potpourri.cli import main

    assert main(["inspect", "oneshot", "img.png", "--load", str(tmp_path), "--resume", "--out", "o"]) == 2
    assert "--resume continues a fit" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- CUDA
@cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_segmenter_trains_and_predicts_on_cuda(precision):
    images, masks = planted_segmentation(4)
    seg = Segmenter(seg_config(steps=4))
    seen = []
    seg.net.classifier.register_forward_hook(lambda module, args, out: seen.append((out.device.type, out.dtype)))
    seg.fit(images, masks, log_every=1, options=TrainOptions(device="cuda", precision=precision, progress=False))
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    assert seen == [("cuda", dtype)] * 4 and all(np.isfinite(r["loss"]) for r in seg.history)
    assert seg.predict(images, device="cuda", precision=precision).shape == masks.shape
    assert seg.latency_ms(rounds=2)["ms_per_image"] > 0  # moved back to the CPU for the CPU latency


@cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_defectgen_trains_and_samples_on_cuda(precision, tmp_path):
    from tests.segment.test_defectgen import planted

    gen = DefectGenLite(tiny_defectgen(train_steps=4))
    options = TrainOptions(device="cuda", precision=precision, progress=False, checkpoint_every=2)
    gen.fit(*planted(4), options=options, checkpoints=tmp_path)
    assert next(gen.global_net.parameters()).device.type == "cuda"
    assert all(np.isfinite(v) for v in gen.fit_info["final_loss"].values())
    images, masks = gen.sample(3, seed=0, precision=precision)
    assert images.shape == (3, 16, 16, 3) and masks.shape == (3, 16, 16)
    resumed = DefectGenLite(tiny_defectgen(train_steps=4))
    resumed.fit(*planted(4), options=TrainOptions(device="cuda", precision=precision, progress=False, resume=True),
                checkpoints=tmp_path)  # fmt: skip
    for key, value in gen.state_tensors().items():
        assert torch.equal(resumed.state_tensors()[key], value), key
    gen.save(tmp_path / "saved")


@cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_oneshot_fits_and_predicts_on_cuda(precision):
    from tests.segment.test_oneshot import ColourFeatures, _config, planted_image

    image, mask = planted_image(0)
    model = OneShotSegmenter(_config(steps=5), source=DenseFeatureSource(ColourFeatures(), temperature=0.1))
    model.fit([image], [mask], options=TrainOptions(device="cuda", precision=precision, progress=False))
    assert model.source_device().type == "cuda" and all(np.isfinite(r["loss"]) for r in model.history)
    assert model.predict([image], precision=precision).shape == (1, 64, 64)
