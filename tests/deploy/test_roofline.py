"""The roofline: per-layer FLOPs and bytes against hand formulas, the bound arithmetic on planted peaks, the peak
measurement on tiny sizes, backends that are not installed, and ``potpourri bench --roofline``."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from potpourri.cli import main
from potpourri.core.registry import count_macs
from potpourri.deploy import latency, roofline
from potpourri.deploy.latency import LatencyRow, bench_models, missing_backends
from potpourri.deploy.roofline import (
    LayerCost,
    MachinePeaks,
    ModelCost,
    Roof,
    below_bound,
    layer_costs,
    layer_times,
    measure_peaks,
    roofline_report,
    roofline_table,
)

pytestmark = pytest.mark.one_thread
F32 = 4
PLANTED = MachinePeaks(1, 100.0, 10.0, 50.0, 512, 256, 256)  # 100 GFLOP/s, 10 GB/s DRAM, 50 GB/s cache


def conv_cost(b, cin, cout, k, groups, h_out, w_out, h_in, w_in, bias=True):
    """Hand formula: 2 MACs per kernel tap; input, weight, bias read once, output written once."""
    flops = 2 * b * cout * (cin // groups) * k * k * h_out * w_out
    n_bytes = F32 * (b * cin * h_in * w_in + cout * (cin // groups) * k * k + (cout if bias else 0))
    return flops, n_bytes + F32 * b * cout * h_out * w_out


@pytest.mark.parametrize(
    ("module", "shape", "expected"),
    [
        (nn.Conv2d(3, 8, 3, padding=1), (2, 3, 8, 8), conv_cost(2, 3, 8, 3, 1, 8, 8, 8, 8)),
        (nn.Conv2d(16, 16, 3, stride=2, groups=16), (1, 16, 9, 9), conv_cost(1, 16, 16, 3, 16, 4, 4, 9, 9)),
        (nn.Conv2d(8, 12, 1, groups=4, bias=False), (1, 8, 5, 5), conv_cost(1, 8, 12, 1, 4, 5, 5, 5, 5, bias=False)),
        (nn.Linear(6, 3), (2, 4, 6), (2 * 8 * 6 * 3, F32 * (8 * 6 + 3 * 6 + 3 + 8 * 3))),
        (nn.BatchNorm2d(4), (2, 4, 3, 3), (0, F32 * (2 * 72 + 4 * 4))),
        (nn.GELU(), (3, 10), (0, F32 * 2 * 30)),
    ],
    ids=["conv", "depthwise-stride2", "grouped-1x1-nobias", "linear-3d", "batchnorm", "gelu"],
)
def test_one_layer_matches_the_hand_formula(module: nn.Module, shape: tuple, expected: tuple[int, int]) -> None:
    (layer,) = layer_costs(module, torch.zeros(shape))
    assert (layer.flops, layer.bytes) == expected
    assert layer.intensity == pytest.approx(expected[0] / expected[1])


def test_small_model_layers_in_order_and_totals_agree_with_count_macs() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Flatten()
    )
    model.append(nn.Linear(8 * 8 * 8, 5))
    layers = layer_costs(model, torch.zeros(2, 3, 8, 8))
    assert [(layer.name, layer.kind) for layer in layers] == [
        ("0", "Conv2d"),
        ("1", "ReLU"),
        ("2", "Conv2d"),
        ("4", "Linear"),
    ]  # the flatten is a view: it moves nothing
    act = F32 * 2 * 8 * 64
    assert layers[1].bytes == 2 * act  # in place, still read once and written once
    assert layers[2].bytes == 2 * act + F32 * (8 * 9 + 8)
    assert sum(layer.flops for layer in layers) == 2 * count_macs(model, (2, 3, 8, 8))


def test_functional_ops_are_charged_to_their_module_and_fused_attention_counts() -> None:
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(16, 48, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, n, _ = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, N, 8) each
            return F.scaled_dot_product_attention(q, k, v)

    layers = {layer.name: layer for layer in layer_costs(Attention(), torch.zeros(1, 5, 16))}
    assert layers["qkv"].flops == 2 * 5 * 16 * 48
    own = layers[""]
    assert own.kind == "Attention (own ops)"
    # Q·Kᵀ and softmax·V: 2 × (B·H·N·N·D) each, D = 8, N = 5, H = 2
    assert own.flops == 2 * (2 * 1 * 2 * 5 * 5 * 8)


def test_a_copying_permute_moves_bytes_and_a_view_does_not() -> None:
    class Permute(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.view(2, 12).t().contiguous()  # view + transpose are free; contiguous copies

    (layer,) = layer_costs(Permute(), torch.zeros(4, 6))
    assert (layer.flops, layer.bytes, layer.ops) == (0, 2 * F32 * 24, 1)


def test_roof_arithmetic_on_planted_peaks() -> None:
    roof = Roof(peak_gflops=100.0, bandwidth_gbs=10.0)
    assert roof.ridge == 10.0
    assert roof.attainable_gflops(2.0) == 20.0  # memory-bound: 10 GB/s × 2 FLOP/B
    assert roof.attainable_gflops(50.0) == 100.0  # compute-bound
    assert roof.time_s(1e9, 1e8) == pytest.approx(0.01)  # 1 GFLOP at 100 GFLOP/s beats 0.1 GB at 10 GB/s
    assert roof.time_s(1e8, 1e9) == pytest.approx(0.1)
    cost = ModelCost("m", (1, 3, 8, 8), [LayerCost("a", "Conv2d", 1e9, 1e8, 1), LayerCost("b", "ReLU", 0, 1e9, 1)])
    # per layer, not on the totals: max(0.01, 0.01) + max(0, 0.1); totals alone would give max(0.01, 0.11)
    assert cost.bound_s(roof) == pytest.approx(0.11)
    assert cost.intensity == pytest.approx(1e9 / 1.1e9)


def test_rows_achieved_share_and_the_per_layer_section_for_a_slow_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    layers = layer_costs(model, torch.zeros(1, 3, 16, 16))
    bound_ms = ModelCost("m", (1, 3, 16, 16), layers).bound_s(PLANTED.roof()) * 1e3
    slow = LatencyRow("m", "eager", 1, 1, 4 * bound_ms, 3 * bound_ms, 5 * bound_ms, 1.0, 3)
    report = roofline_report(
        {"m": model}, [slow], PLANTED, image_size=16, not_installed={"openvino": "not installed"}, per_layer_top=1
    )
    row = report.rows[0]
    assert row["achieved"] == pytest.approx(0.25) and row["bound_ms"] == pytest.approx(bound_ms)
    assert row["cache_bound_ms"] <= row["bound_ms"]
    assert report.rows[1] == {"model": "m", "batch": 1, "backend": "openvino", "note": "not installed"}
    assert below_bound(report.rows) == [("m", 1)]
    assert list(report.per_layer) == ["m @ batch 1"]
    assert report.per_layer["m @ batch 1"].count("\n") == 2  # header, rule, one layer
    text = report.text()
    assert "100.0 GFLOP/s" in text and "| m | 1 | openvino |" in text and "25%" in text


def test_below_bound_uses_the_fastest_backend() -> None:
    rows = [
        {"model": "a", "batch": 1, "backend": "eager", "achieved": 0.3},
        {"model": "a", "batch": 1, "backend": "onnxruntime", "achieved": 0.7},
        {"model": "b", "batch": 1, "backend": "eager", "achieved": 0.5},
        {"model": "b", "batch": 1, "backend": "openvino", "note": "not installed"},
    ]
    assert below_bound(rows) == [("b", 1)]
    assert "not installed" in roofline_table(rows[3:])


def test_peaks_on_tiny_sizes_are_positive_and_finite_and_threads_are_restored() -> None:
    before = torch.get_num_threads()
    peaks = measure_peaks(1, sizes=(32, 64), stream_mib=1, cache_kib=48, reps=2, min_time_s=0.002)
    values = [peaks.matmul_gflops, peaks.bandwidth_gbs, peaks.cache_bandwidth_gbs]
    assert all(math.isfinite(v) and v > 0 for v in values) and peaks.matmul_size in (32, 64)
    assert peaks.matmul_engine in ("torch.mm", "onnxruntime")
    assert torch.get_num_threads() == before


def test_layer_times_cover_every_layer_with_ops() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.Flatten()))
    times = layer_times(model, torch.zeros(1, 3, 8, 8), rounds=2, warmup=1)
    assert {"", "0", "1", "1.0", "1.1"} == set(times)
    assert all(seconds >= 0 for seconds in times.values()) and times["0"] > 0


def test_a_missing_backend_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    real = latency.importlib.util.find_spec
    monkeypatch.setattr(latency.importlib.util, "find_spec", lambda name: None if name == "openvino" else real(name))
    assert missing_backends(["eager", "openvino-bf16"]) == {"openvino-bf16": "not installed (pip install openvino)"}
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    rows, conditions = bench_models(["tiny"], models={"tiny": model}, backends=["eager", "openvino"], rounds=1,
                                    image_size=16)  # fmt: skip
    assert [(r.model, r.backend) for r in rows] == [("tiny", "eager")]
    assert conditions["not_installed"] == {"openvino": "not installed (pip install openvino)"}


def test_bench_roofline_verb_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    tiny = functools.partial(roofline.measure_peaks, sizes=(32,), stream_mib=1, cache_kib=48, reps=1, min_time_s=0.002)
    monkeypatch.setattr(roofline, "measure_peaks", tiny)
    out = tmp_path / "bench"
    argv = ["bench", "repconvnet_s", "--image-size", "32", "--rounds", "1", "--roofline", "--per-layer", "3"]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "machine at 1 thread(s)" in printed and "| repconvnet_s | 1 | eager |" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["peaks"]["threads"] == 1 and summary["roofline"][0]["gflop"] > 0
    assert "of bound" in (out / "results.md").read_text()


@pytest.mark.skipif(missing_backends(["openvino"]) != {}, reason="needs onnx, onnxruntime and openvino")
def test_every_backend_times_one_exported_graph() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    backends = ["eager", "onnxruntime", "openvino", "openvino-bf16"]
    rows, conditions = bench_models(["tiny"], models={"tiny": model}, backends=backends, batches=[1, 2], rounds=1,
                                    image_size=16)  # fmt: skip
    assert [(r.backend, r.batch) for r in rows] == [(b, n) for n in (1, 2) for b in backends]
    assert all(r.median_ms > 0 for r in rows) and conditions["not_installed"] == {}
    assert isinstance(conditions["openvino_native_bf16"], bool)
