"""The detector and the mask head through ``core.training.Trainer``: SIGKILL then ``--resume`` ends bitwise where an
uninterrupted run does (1 thread), bf16 on the CPU runs under autocast, ``--device``/``--precision`` reach the code
of every ``detect`` verb, and (with a GPU) fp16/bf16 training on CUDA."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from potpourri.core.training import TrainOptions
from potpourri.detect.mask_head import MaskHead, MaskHeadConfig, predict_instances, train_mask_head
from potpourri.detect.train import DetectTrainConfig, evaluate_detector, save_detector, train_detector
from tests.detect.test_mask_head import _planted as _planted_instances
from tests.detect.test_mask_head import _tiny_detector
from tests.detect.test_yolo import _planted, _tiny
from tests.resume import assert_resumes_bitwise

pytestmark = pytest.mark.one_thread
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CLASSES = ("red", "blue")


def _detect_cfg(epochs: int = 4) -> DetectTrainConfig:
    return DetectTrainConfig(class_names=CLASSES, image_size=64, epochs=epochs, batch_size=4, lr=5e-3,
                             warmup_steps=3, eval_every=1, progress=False)  # fmt: skip


def detector_job(out: str, resume: bool) -> None:
    """8 planted images, 2 steps an epoch, 4 epochs; a checkpoint every 3 steps, so the one at step 6 lands on
    epoch 3's last step before its history row is made; test mAP (and the best checkpoint) after the last epoch."""
    train = _planted(8)
    options = TrainOptions(device="cpu", checkpoint_every=3, resume=resume, progress=False)
    cfg = replace(_detect_cfg(), eval_every=0)
    result = train_detector(train, train[:4], cfg, model=_tiny(), run_path=out, options=options)
    save_detector(out, result.model, {"model": "tiny", "class_names": list(CLASSES), "image_size": 64})
    rows = result.history
    keys = ("epoch", "step", "lr", "loss", "loss_cls", "loss_giou", "loss_dfl", "test_map50")
    history = {key: torch.tensor([row.get(key, -1.0) for row in rows], dtype=torch.float64) for key in keys}
    save_file(history, f"{out}/history.safetensors")


@pytest.mark.slow  # three fresh processes: ~15 s on 2 idle cores
def test_the_detector_killed_after_step_7_resumes_to_bitwise_identical_weights_and_history(tmp_path: Path) -> None:
    assert_resumes_bitwise(
        "tests.detect.test_resume:detector_job",
        tmp_path,
        kill_at=7,  # resumes from step 6 (epoch 3's row still to make from the saved sums) and redoes step 7
        outputs=["detector.safetensors", "history.safetensors"],
        checkpoints="checkpoints",
    )
    history = load_file(str(tmp_path / "killed" / "history.safetensors"))
    assert history["epoch"].tolist() == [1, 2, 3, 4] and history["step"].tolist() == [2, 4, 6, 8]
    assert torch.isfinite(history["loss"]).all()
    last = json.loads((tmp_path / "killed" / "checkpoints" / "last.json").read_text())
    assert last["step"] == 8 and last["state"]["open"] is None  # finish() wrote the closed final state
    assert history["test_map50"][:3].tolist() == [-1.0] * 3 and 0.0 <= history["test_map50"][3] <= 1.0
    for run in ("straight", "killed"):  # the best checkpoint follows test mAP@0.5 in both runs alike
        best = json.loads((tmp_path / run / "checkpoints" / "best.json").read_text())
        assert best == {"step": 8, "metric": history["test_map50"][3].item()}
    straight = load_file(str(tmp_path / "straight" / "checkpoints" / "best.safetensors"))
    resumed = load_file(str(tmp_path / "killed" / "checkpoints" / "best.safetensors"))
    assert all(torch.equal(straight[k], v) for k, v in resumed.items())


def mask_job(out: str, resume: bool) -> None:
    """The mask head on a frozen tiny detector: 8 steps, checkpoints every 3, a torch and a NumPy generator."""
    cfg = MaskHeadConfig(dim=16, roi_size=14, max_steps=8, batch_size=2, lr=5e-3, progress=False)
    options = TrainOptions(device="cpu", checkpoint_every=3, resume=resume, progress=False)
    head, history = train_mask_head(_tiny_detector(), _planted_instances(6), cfg, options=options,
                                    checkpoints=Path(out) / "checkpoints")  # fmt: skip
    assert history["steps"] == 8 and len(history["losses"]) == 8
    save_file({**head.state_dict(), "losses": torch.tensor(history["losses"], dtype=torch.float64)},
              f"{out}/mask_head.safetensors")  # fmt: skip


@pytest.mark.slow  # three fresh processes: ~15 s on 2 idle cores
def test_the_mask_head_killed_after_step_5_resumes_to_bitwise_identical_weights(tmp_path: Path) -> None:
    assert_resumes_bitwise(
        "tests.detect.test_resume:mask_job",
        tmp_path,
        kill_at=5,  # last checkpoint at step 3: steps 4 and 5 are redone
        outputs=["mask_head.safetensors"],
        checkpoints="checkpoints",
    )


def _record_dtypes(module: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_bf16_on_the_cpu_trains_the_detector_and_the_mask_head_under_autocast() -> None:
    train = _planted(8)
    model = _tiny()
    seen = _record_dtypes(model)
    options = TrainOptions(device="cpu", precision="bf16", progress=False)
    result = train_detector(train, train[:2], _detect_cfg(epochs=2), model=model, options=options)
    assert set(seen) == {torch.bfloat16}  # every forward pass, training and test mAP, ran in bf16
    assert all(math.isfinite(row["loss"]) for row in result.history) and result.steps == 4
    assert 0.0 <= result.final["test_map50"] <= 1.0

    detector = _tiny_detector()
    cfg = MaskHeadConfig(dim=16, roi_size=14, max_steps=3, batch_size=2, progress=False)
    head = MaskHead.for_detector(detector, 16, 14)
    seen = _record_dtypes(head)
    head, history = train_mask_head(detector, _planted_instances(4), cfg, head, options=options)
    assert set(seen) == {torch.bfloat16} and all(math.isfinite(v) for v in history["losses"])
    seen.clear()
    found = predict_instances(detector, head, [s.image for s in _planted_instances(2, seed=3)], conf=0.0,
                              max_det=2, precision="bf16")  # fmt: skip
    assert set(seen) == {torch.bfloat16} and all(f["masks"].dtype == bool for f in found)


def test_lite0_features_in_bf16_stay_close_to_fp32_and_come_back_fp32_on_the_cpu() -> None:
    from potpourri.detect.simdetr import lite0_feature_maps
    from potpourri.models.yolo import Lite0Backbone

    torch.manual_seed(0)
    backbone = Lite0Backbone(pretrained=False)
    images = [np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8) for i in range(2)]
    seen = _record_dtypes(backbone.blocks[2])
    full = lite0_feature_maps(images, backbone=backbone, upsample=1, device="cpu")
    half = lite0_feature_maps(images, backbone=backbone, upsample=1, device="cpu", precision="bf16")
    assert seen == [torch.float32, torch.bfloat16] and half.dtype == torch.float32 and half.shape == full.shape
    assert (half - full).abs().max() < 0.05 and not torch.equal(half, full)  # unit-norm features, bf16 rounding


def test_patience_stops_at_an_epoch_boundary_and_an_old_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    from potpourri.core.errors import PotpourriError

    train = _planted(8)
    cfg = replace(_detect_cfg(epochs=6), lr=1e-7)  # learns nothing: test mAP@0.5 stays put, never improves
    options = TrainOptions(device="cpu", patience=1, progress=False)
    result = train_detector(train, train[:2], cfg, model=_tiny(), run_path=tmp_path, options=options)
    assert [row["test_map50"] for row in result.history] == [0.0, 0.0]
    assert result.steps == 4 and json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 2

    (tmp_path / "checkpoints" / "last.json").write_text(json.dumps({"epoch": 0, "step": 2, "history": []}))
    with pytest.raises(PotpourriError, match="older potpourri"):
        train_detector(train, None, cfg, model=_tiny(), run_path=tmp_path, resume=True)


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from potpourri.cli import main

    code = main(["detect", "train", "--data", "ds-synth:brick", "--image-size", "64", "--per-kind", "1",
                 "--out", str(tmp_path / "empty"), "--resume", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no checkpoint to resume" in err[0], err
    assert main(["detect", "train", "--data", "ds-synth:brick", "--resume"]) == 2
    assert "--resume continues the run in --out" in capsys.readouterr().err


def test_device_and_precision_reach_every_detect_verb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each verb's ``--device cpu --precision bf16`` arrives at the autocast its computation runs under."""
    from PIL import Image

    import potpourri.core.training as training
    import potpourri.detect.mask_head as mask_head
    import potpourri.detect.train as detect_train
    from potpourri.cli import main

    calls: list[tuple[str, str, str]] = []
    real = training.autocast

    def recording(where: str):
        def autocast(device: torch.device, precision: str):
            calls.append((where, device.type, precision))
            return real(device, precision)

        return autocast

    monkeypatch.setattr(training, "autocast", recording("trainer"))
    monkeypatch.setattr(detect_train, "autocast", recording("detect"))
    monkeypatch.setattr(mask_head, "autocast", recording("mask"))
    compute = ["--device", "cpu", "--precision", "bf16", "--threads", "1"]
    run = tmp_path / "run"
    assert main(["detect", "train", "--data", "ds-synth:brick", "--image-size", "64", "--epochs", "1",
                 "--per-kind", "1", "--batch-size", "4", "--out", str(run), *compute]) == 0  # fmt: skip
    assert ("trainer", "cpu", "bf16") in calls and ("detect", "cpu", "bf16") in calls
    assert json.loads((run / "checkpoints" / "last.json").read_text())["step"] > 0

    calls.clear()
    image = tmp_path / "img.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(image)
    assert main(["detect", "predict", str(run), str(image), "--out", str(tmp_path / "pred"), *compute]) == 0
    assert calls == [("detect", "cpu", "bf16")]
    calls.clear()
    assert main(["detect", "eval", str(run), "--data", "ds-synth:brick", "--per-kind", "1", *compute]) == 0
    assert calls and set(calls) == {("detect", "cpu", "bf16")}
    calls.clear()
    assert main(["detect", "mask-train", str(run), "--data", "ds-synth:brick", "--steps", "2", "--per-kind", "1",
                 "--out", str(tmp_path / "mask"), *compute]) == 0  # fmt: skip
    assert ("mask", "cpu", "bf16") in calls and ("trainer", "cpu", "bf16") in calls
    summary = json.loads((tmp_path / "mask" / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["last_loss"])
    assert main(["detect", "predict", str(run), str(image), "--device", "cpu", "--precision", "fp16"]) == 2


@cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_training_of_the_detector_and_the_mask_head(tmp_path: Path, precision: str) -> None:
    train = _planted(8)
    options = TrainOptions(device="cuda", precision=precision, progress=False)
    result = train_detector(train, train[:4], _detect_cfg(epochs=3), model=_tiny(), run_path=tmp_path / "det",
                            options=options)  # fmt: skip
    assert next(result.model.parameters()).device.type == "cuda"
    assert all(math.isfinite(row["loss"]) for row in result.history)
    metrics = evaluate_detector(result.model, train[:4], image_size=64, device="cuda", precision=precision)
    assert 0.0 <= metrics["map50"] <= 1.0
    resumed = train_detector(
        train,
        train[:4],
        _detect_cfg(epochs=4),
        model=_tiny(),
        run_path=tmp_path / "det",
        options=TrainOptions(device="cuda", precision=precision, resume=True, progress=False),
    )
    assert resumed.steps == 8 and [row["epoch"] for row in resumed.history] == [1, 2, 3, 4]

    detector = _tiny_detector()
    cfg = MaskHeadConfig(dim=16, roi_size=14, max_steps=6, batch_size=2, progress=False)
    head, history = train_mask_head(detector, _planted_instances(4), cfg, options=options)
    assert next(head.parameters()).device.type == "cuda" and all(math.isfinite(v) for v in history["losses"])
    found = predict_instances(detector, head, [s.image for s in _planted_instances(2, seed=3)], conf=0.0,
                              max_det=2, device="cuda", precision=precision)  # fmt: skip
    assert all(f["masks"].shape[1:] == (64, 64) for f in found)
