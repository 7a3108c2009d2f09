"""YOLOv6 v3 parts of the detector: BiC neck, SimCSPSPPF, anchor-aided training (AAT) and the ATSS → TAL schedule,
each on a tiny model: shapes, backward, re-parameterisation and ONNX parity, removal of the anchor branch."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from potpourri import create_model
from potpourri.core.errors import PotpourriError
from potpourri.models.yolo import EfficientRep, YoloDetector
from tests.detect.test_yolo import _randomise

OPTIONS = {
    "bic": {"neck": "bic"},
    "simcspsppf": {"sppf": "simcspsppf"},
    "aat": {"aat": True},
    "all": {"neck": "bic", "sppf": "simcspsppf", "aat": True},
}


def _tiny_v3(options: dict, seed: int = 0) -> YoloDetector:
    torch.manual_seed(seed)
    options = dict(options)
    backbone = EfficientRep((8, 8, 16, 16, 32), (1, 1, 1, 1), sppf=options.pop("sppf", "simsppf"))
    model = YoloDetector(backbone, num_classes=2, neck_widths=(16, 16, 32), reg_max=8, **options)
    _randomise(model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    for conv in [*(model.head.cls_preds_ab or []), *(model.head.reg_preds_ab or [])]:
        conv.weight.data.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.1)
    return model


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_forward_shapes_and_backward(name: str) -> None:
    model = _tiny_v3(OPTIONS[name]).train()
    out = model(_x())
    anchors = model.num_anchors((64, 64))  # 64 + 16 + 4 points
    if model.head.has_anchor_branch:
        raw, raw_ab = out
        assert raw_ab.shape == (2, anchors * len(model.head.anchor_shapes), 4 + 2)
        loss = raw.square().mean() + raw_ab.square().mean()
    else:
        raw, loss = out, out.square().mean()
    assert raw.shape == (2, anchors, 4 * 9 + 2)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing  # every parameter, the new blocks' included, takes part in training


def test_options_build_the_named_blocks_and_registered_variants_take_them() -> None:
    from potpourri.models.yolo_blocks import BiC, SimCSPSPPF, SimSPPF

    model = create_model("yolo_rep_n", num_classes=3, neck="bic", sppf="simcspsppf", aat=True)
    assert sum(isinstance(m, BiC) for m in model.modules()) == 2  # P4 and P3 top-down steps
    assert any(isinstance(m, SimCSPSPPF) for m in model.modules())
    assert not any(isinstance(m, SimSPPF) for m in model.modules())
    default = create_model("yolo_rep_n", num_classes=3)
    assert not any(isinstance(m, BiC | SimCSPSPPF) for m in default.modules()) and not default.head.has_anchor_branch


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"neck": "bifpn"}, "unknown neck 'bifpn'; choose one of reppan, bic"),
     ({"sppf": "sppf"}, "unknown sppf 'sppf'; choose one of simsppf, simcspsppf")],
)  # fmt: skip
def test_a_bad_option_is_one_line_error(kwargs: dict, message: str) -> None:
    with pytest.raises(PotpourriError, match=message):
        create_model("yolo_rep_n", num_classes=2, **kwargs)
    with pytest.raises(PotpourriError, match="no SPPF block"):
        create_model("yolo_lite0_pan", num_classes=2, sppf="simcspsppf")


@pytest.mark.parametrize("name", list(OPTIONS))
def test_reparameterize_parity_with_each_option(name: str) -> None:
    model = _tiny_v3(OPTIONS[name]).eval()
    x = _x()
    with torch.no_grad():
        before = model(x)
        fused = copy.deepcopy(model).reparameterize()
        after = fused(x)
    assert (before[0] - before[1]).abs().max() > 1e-3  # outputs depend on the input: the parity means something
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert (after - before).abs().max() <= 1e-4


def test_anchor_branch_is_absent_after_deploy_with_the_anchor_free_outputs() -> None:
    model = _tiny_v3(OPTIONS["aat"])
    trained_keys = [k for k in model.state_dict() if "_ab." in k]
    assert trained_keys  # the branch exists while training ...
    x = _x()
    with torch.no_grad():
        _, raw_ab = model.train()(x)  # (BN in train mode updates its running statistics; eval below uses them)
        eval_out = model.eval()(x)
    assert torch.is_tensor(eval_out)  # ... eval mode already skips it
    assert raw_ab.abs().max() > 0
    fused = copy.deepcopy(model).reparameterize()
    assert not fused.head.has_anchor_branch and fused.head.cls_preds_ab is None and fused.head.reg_preds_ab is None
    assert not [k for k in fused.state_dict() if "_ab." in k]
    plain = _tiny_v3({})  # the same architecture without AAT: the deployed graph must hold exactly its tensors
    assert sorted(fused.state_dict()) == sorted(copy.deepcopy(plain).reparameterize().state_dict())
    with torch.no_grad():
        assert (fused(x) - eval_out).abs().max() <= 1e-4
    fused.train()
    with torch.no_grad():
        assert torch.is_tensor(fused(x))  # removed for good: even training mode gives the anchor-free output only


def test_onnx_export_with_all_options_has_no_anchor_branch(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import onnx

    from potpourri.deploy.export import export_onnx

    model = _tiny_v3(OPTIONS["all"])
    result = export_onnx(model, tmp_path, input_size=(3, 64, 64), reparam=True, name="yolo_v3_tiny")
    assert result.max_abs_diff <= 1e-4
    graph = onnx.load(str(result.onnx_path)).graph
    exported = sum(int(torch.tensor(list(t.dims)).prod()) for t in graph.initializer)
    fused_numel = sum(p.numel() for p in copy.deepcopy(model).reparameterize().parameters())
    branch_numel = sum(
        p.numel() for p in [*model.head.cls_preds_ab.parameters(), *model.head.reg_preds_ab.parameters()]
    )
    assert branch_numel > 0 and exported <= fused_numel  # equal up to identical tensors the exporter shares
    assert not any("_ab" in t.name for t in graph.initializer)
    assert model.head.has_anchor_branch  # export worked on a copy; the training model keeps its branch


# ----------------------------------------------------------------------------------------------- training
def test_assigner_at_switches_after_the_warmup_epochs() -> None:
    from potpourri.detect.yolo_v3 import assigner_at

    assert [assigner_at(e, "tal", 2) for e in range(4)] == ["atss", "atss", "tal", "tal"]
    assert [assigner_at(e, "tal", 0) for e in range(2)] == ["tal", "tal"]  # default: no warm-up
    with pytest.raises(PotpourriError, match="atss_warmup_epochs must be 0 or more, got -1"):
        assigner_at(0, "tal", -1)


def test_training_switches_assigner_at_the_right_epoch_for_both_branches(monkeypatch: pytest.MonkeyPatch) -> None:
    from potpourri.detect import train as train_module
    from potpourri.detect.train import DetectTrainConfig, train_detector
    from tests.detect.test_yolo import _planted

    calls: list[str] = []
    for cls, name in ((train_module.ATSSAssigner, "atss"), (train_module.TaskAlignedAssigner, "tal")):
        original = cls.__call__

        def spy(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)
    torch.set_num_threads(1)
    cfg = DetectTrainConfig(class_names=("red", "blue"), image_size=64, epochs=3, batch_size=4, lr=5e-3,
                            warmup_steps=1, atss_warmup_epochs=2, progress=False)  # fmt: skip
    result = train_detector(_planted(4), None, cfg, model=_tiny_v3(OPTIONS["aat"]))  # one step per epoch
    assert calls == ["atss", "atss", "atss", "atss", "tal", "tal"]  # per step: anchor-free, then anchor branch
    assert [row["assigner"] for row in result.history] == ["atss", "atss", "tal"]
    for row in result.history:
        assert all(np.isfinite(row[k]) for k in ("loss", "loss_ab_cls", "loss_ab_giou")) and row["positives_ab"] > 0
    assert not result.model.training and torch.is_tensor(result.model(_x()))


# ----------------------------------------------------------------------------------------------- CLI and saving
def test_cli_passes_the_v3_options_and_refuses_bad_ones(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from potpourri.cli import main
    from potpourri.detect import pipeline

    seen: dict = {}
    monkeypatch.setattr(pipeline, "train_run", lambda **kwargs: seen.update(kwargs))
    argv = ["detect", "train", "--data", "ds-synth:brick", "--neck", "bic", "--sppf", "simcspsppf", "--aat",
            "--atss-warmup-epochs", "3"]  # fmt: skip
    assert main(argv) == 0
    assert seen["detector_options"] == {"neck": "bic", "sppf": "simcspsppf", "aat": True}
    assert seen["atss_warmup_epochs"] == 3
    for bad in (["--neck", "bifpn"], ["--atss-warmup-epochs", "-1"]):
        assert main(["detect", "train", "--data", "ds-synth:brick", *bad]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "invalid choice: 'bifpn'" in errors[0]  # one line per bad option


def test_save_load_rebuilds_a_detector_with_its_options(tmp_path: Path) -> None:
    from potpourri.detect.train import DetectTrainConfig, load_detector, model_options, save_detector

    cfg = DetectTrainConfig(class_names=("a", "b"), neck="bic", sppf="simcspsppf", aat=True)
    model = create_model("yolo_rep_n", num_classes=2, **model_options(cfg)).eval()
    save_detector(tmp_path, model, {"model": "yolo_rep_n", "class_names": ["a", "b"], "image_size": 64,
                                    "model_options": model_options(cfg)})  # fmt: skip
    loaded, _ = load_detector(tmp_path)
    assert loaded.head.has_anchor_branch and loaded.neck.bic3 is not None
    x = _x(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert model_options(DetectTrainConfig(class_names=("a",))) == {}  # defaults add nothing to the metadata
