"""ONNX export parity for every registered image model, metadata, the latency protocol, and the two verbs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from potpourri import PotpourriError, create_model, list_models
from potpourri.core.registry import REGISTRY
from potpourri.deploy.export import export_onnx
from potpourri.deploy.latency import LatencyRow, bench_models, latency_table
from tests.inprocess import run_main

# only the tests that run an ONNX graph need the [onnx] extra (part of the dev install); the others always run
needs_onnxruntime = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None,
    reason="needs the [onnx] extra (onnx, onnxruntime)",
)
IMAGE_MODELS = [n for n in list_models() if REGISTRY[n].modality == "image"]
# ViTs resample their position embedding (bicubic, antialiased: no ONNX op) unless built at the export size
BUILD_AT_64 = {
    "vit_tiny_frozenlm": {"img_size": 64},
    "clip_vit_tiny_minilm": {
        "vision": {
            "img_size": 64,
            "patch_size": 16,
            "embed_dim": 192,
            "depth": 6,
            "num_heads": 3,
            "dynamic_img_size": False,
        }
    },
}


@needs_onnxruntime
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_every_image_model_exports_with_parity(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    result = export_onnx(create_model(name, **BUILD_AT_64.get(name, {})), tmp_path, input_size=(3, 64, 64))
    assert result.max_abs_diff <= 1e-4
    metadata = json.loads(result.metadata_path.read_text())
    assert metadata["dynamic_batch"] and metadata["input_size"] == [3, 64, 64]


@needs_onnxruntime
def test_reparameterised_export_matches_the_unfused_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("repconvnet_s", num_classes=4).eval()
    for m in model.modules():  # non-trivial BN statistics, so fusion has something to get right
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    result = export_onnx(model, tmp_path, input_size=(3, 64, 64), reparam=True)
    from potpourri.deploy.export import ort_session

    session = ort_session(result.onnx_path)
    x = torch.randn(3, 3, 64, 64)  # a batch size other than the traced one
    (onnx_out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(onnx_out) - model(x)).abs().max() <= 1e-4
    assert json.loads(result.metadata_path.read_text())["reparameterized"] is True


@needs_onnxruntime
def test_unexportable_model_fails_in_one_line(tmp_path: Path) -> None:
    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nonzero(x > 0).float().sum().reshape(1, 1).expand(x.shape[0], 1).contiguous().numpy()

    with pytest.raises(PotpourriError, match="cannot be exported to ONNX") as info:
        export_onnx(DataDependent(), tmp_path, input_size=(3, 8, 8))
    assert "\n" not in str(info.value)
    assert not list(tmp_path.glob("*.onnx*"))  # no half-written graph left behind


def test_markdown_table_speedups_are_against_the_reference() -> None:
    rows = [
        LatencyRow("ref", "eager", 1, 1, 10.0, 9.0, 11.0, 100.0, 5),
        LatencyRow("fast", "eager", 1, 1, 4.0, 3.9, 4.1, 250.0, 5, 12.0),
    ]
    table = latency_table(rows, reference="ref")
    assert "| fast | eager | 1 | 4.00 | 3.90–4.10 | 250.0 | 12 | 2.50x |" in table
    assert "| ref | eager | 1 | 10.00 | 9.00–11.00 | 100.0 | – | 1.00x |" in table


def test_bench_rejects_bad_settings() -> None:
    with pytest.raises(PotpourriError, match="unknown backend 'tensorrt'"):
        bench_models(["repconvnet_s"], backends=["tensorrt"])
    with pytest.raises(PotpourriError, match="--threads 99"):
        bench_models(["repconvnet_s"], threads=99)


@needs_onnxruntime
def test_export_and_bench_verbs(tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = run_main("export", "efficientnet_lite0", "--pretrained", "--size", "96", "--out", str(out))
    assert result.returncode == 0, result.stderr
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert len(metadata["class_names"]) == 1000 and metadata["parity_max_abs_diff"] <= 1e-4
    bench = tmp_path / "bench"
    result = run_main("bench", "repconvnet_s", "--reparam", "--size", "32", "--rounds", "2", "--out", str(bench))
    assert result.returncode == 0, result.stderr
    summary = json.loads((bench / "summary.json").read_text())
    assert {r["model"] for r in summary["rows"]} == {"repconvnet_s", "repconvnet_s+reparam"}
    assert (bench / "results.md").read_text().startswith("| model |")


def test_bench_rejects_an_unknown_allocator() -> None:
    with pytest.raises(PotpourriError, match="unknown allocator 'jemalloc'"):
        bench_models(["repconvnet_s"], allocator="jemalloc")
