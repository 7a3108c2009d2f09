"""One latency protocol for the whole project: pinned threads, warm-up, interleaved rounds, median and spread.

Interleaving (A, B, C, A, B, C, …) makes drift and a busy neighbour hit every candidate alike; the load average
is logged before and after so a noisy run can be recognised.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from potpourri.core.errors import PotpourriError
from potpourri.core.timing import interleaved_timings, page_faults_per_call, quartiles, retain_freed_memory
from potpourri.report.tables import markdown_table

__all__ = [
    "ALLOCATORS",
    "BACKENDS",
    "LatencyRow",
    "bench_models",
    "build_candidates",
    "latency_table",
    "missing_backends",
    "openvino_has_bf16",
]

BACKENDS = ("eager", "onnxruntime", "openvino", "openvino-bf16")
ALLOCATORS = ("retain", "default")  # retain: glibc keeps freed blocks (core.timing.retain_freed_memory)
# what each backend imports (the OpenVINO ones read the ONNX graph, exported with an ONNX Runtime parity check)
_NEEDS = {
    "onnxruntime": ("onnx", "onnxruntime"),
    "openvino": ("onnx", "onnxruntime", "openvino"),
    "openvino-bf16": ("onnx", "onnxruntime", "openvino"),
}


@dataclass
class LatencyRow:
    """Latency of one (model, backend, batch) at a thread count: median and quartiles over rounds."""

    model: str
    backend: str
    batch: int
    threads: int
    median_ms: float
    q1_ms: float
    q3_ms: float
    images_per_s: float
    rounds: int
    faults_per_call: float = float("nan")  # minor page faults per call, after the timed rounds


def _eager_call(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def call() -> Any:
        with torch.inference_mode():
            return model(x)

    return call


def _ort_call(onnx_path: str, x: torch.Tensor, threads: int) -> Callable[[], Any]:
    from potpourri.deploy.export import ort_session

    session = ort_session(onnx_path, threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def _openvino_call(onnx_path: str, x: torch.Tensor, threads: int, precision: str) -> Callable[[], Any]:
    import openvino as ov

    core = ov.Core()
    graph = core.read_model(onnx_path)
    graph.reshape(list(x.shape))  # a static shape: OpenVINO plans memory and kernels once
    # the precision hint matters: OpenVINO picks bf16 by itself on CPUs with bf16 units
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    request = core.compile_model(graph, "CPU", config).create_infer_request()
    feed = {0: x.numpy()}
    return lambda: request.infer(feed)


def openvino_has_bf16() -> bool | None:
    """Whether OpenVINO reports native bf16 on this CPU (else the bf16 hint runs f32); None without OpenVINO."""
    if importlib.util.find_spec("openvino") is None:
        return None
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def missing_backends(backends: Sequence[str]) -> dict[str, str]:
    """``{backend: "not installed (pip install …)"}`` for each requested backend whose packages are missing."""
    missing = {}
    for backend in backends:
        absent = [m for m in _NEEDS.get(backend, ()) if importlib.util.find_spec(m) is None]
        if absent:
            missing[backend] = f"not installed (pip install {' '.join(absent)})"
    return missing


def build_candidates(
    names: Sequence[str], *, reparam: bool = False, models: dict[str, torch.nn.Module] | None = None
) -> dict[str, torch.nn.Module]:
    """Eval-mode models by name (pre-built ``models`` first, else the registry), plus ``<name>+reparam`` copies."""
    from potpourri.core.registry import create_model
    from potpourri.models.reparam import reparameterize

    built: dict[str, torch.nn.Module] = {}
    for name in names:
        model = (models or {}).get(name) or create_model(name, pretrained=False)
        built[name] = model.eval()
        if reparam:
            built[f"{name}+reparam"] = reparameterize(model)
    return built


def _backend_call(
    backend: str, model: torch.nn.Module, x: torch.Tensor, threads: int, exported: Callable[[], str]
) -> Callable[[], Any]:
    if backend == "eager":
        return _eager_call(model, x)
    if backend == "onnxruntime":
        return _ort_call(exported(), x, threads)
    return _openvino_call(exported(), x, threads, "bf16" if backend == "openvino-bf16" else "f32")


def bench_models(
    names: Sequence[str],
    *,
    batches: Sequence[int] = (1,),
    threads: int = 1,
    backends: Sequence[str] = ("eager",),
    image_size: int = 224,
    rounds: int = 10,
    reparam: bool = False,
    models: dict[str, torch.nn.Module] | None = None,
    allocator: str = "retain",
) -> tuple[list[LatencyRow], dict[str, Any]]:
    """Time every model × backend × batch in one interleaved protocol; returns rows and the run's conditions.

    ``reparam`` adds a ``<name>+reparam`` candidate for each model. ``models`` may pass pre-built modules by name.
    ``allocator="retain"`` (the default) makes glibc keep freed memory for the whole process first, so eager models
    with megabyte activations are not timed re-faulting their pages (``"default"`` leaves malloc as it is).
    Backends whose packages are missing are left out and listed in ``conditions["not_installed"]``.
    Example:
        rows, conditions = bench_models(["efficientmod_xxs", "repconvnet_s"], batches=[1, 8], reparam=True)
    """
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise PotpourriError(f"unknown backend '{unknown[0]}'; choose from {', '.join(BACKENDS)}")
    if threads < 1 or threads > (os.cpu_count() or 1):
        raise PotpourriError(f"--threads {threads} is outside 1..{os.cpu_count()} (cores on this machine)")
    if allocator not in ALLOCATORS:
        raise PotpourriError(f"unknown allocator '{allocator}'; choose from {', '.join(ALLOCATORS)}")
    retained = retain_freed_memory() if allocator == "retain" else False
    not_installed = missing_backends(backends)
    backends = [b for b in backends if b not in not_installed]
    torch.set_num_threads(threads)
    built = build_candidates(names, reparam=reparam, models=models)
    rows: list[LatencyRow] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        graphs: dict[str, str] = {}  # one ONNX export per model (dynamic batch) serves every batch and runtime

        def exporter(name: str, model: torch.nn.Module, x: torch.Tensor) -> Callable[[], str]:
            def exported() -> str:
                if name not in graphs:
                    from potpourri.deploy.export import export_onnx

                    safe = name.replace("/", "_").replace("+", "_")
                    graphs[name] = str(export_onnx(model, folder, input_size=tuple(x.shape[1:]), name=safe).onnx_path)
                return graphs[name]

            return exported

        for batch in batches:
            x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
            candidates = {
                f"{name}|{backend}": _backend_call(backend, model, x, threads, exporter(name, model, x))
                for name, model in built.items()
                for backend in backends
            }
            timings = interleaved_timings(candidates, rounds=rounds)
            for key, values in timings.items():
                name, backend = key.split("|")
                q1, median, q3 = quartiles(values)
                faults = page_faults_per_call(candidates[key], calls=2)
                rows.append(
                    LatencyRow(
                        name, backend, batch, threads, median * 1e3, q1 * 1e3, q3 * 1e3, batch / median, rounds, faults
                    )
                )
    conditions = {
        "threads": threads,
        "image_size": image_size,
        "rounds": rounds,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "not_installed": not_installed,
        "allocator": allocator if allocator == "default" or retained else "default (mallopt unavailable)",
    }
    if any(b.startswith("openvino") for b in backends):
        conditions["openvino_native_bf16"] = openvino_has_bf16()
    return rows, conditions


def latency_table(rows: Sequence[LatencyRow], *, reference: str | None = None) -> str:
    """A Markdown table of the rows; with ``reference``, a column of speed-ups against it (same backend, batch)."""
    ref = {(r.backend, r.batch): r.median_ms for r in rows if r.model == reference}
    header = ["model", "backend", "batch", "median ms", "IQR ms", "images/s", "faults/call"]
    header += ["speed-up"] if reference else []
    cells = []
    for r in rows:
        row = [
            r.model,
            r.backend,
            r.batch,
            f"{r.median_ms:.2f}",
            f"{r.q1_ms:.2f}–{r.q3_ms:.2f}",
            f"{r.images_per_s:.1f}",
            "–" if r.faults_per_call != r.faults_per_call else f"{r.faults_per_call:.0f}",
        ]
        if reference:
            base = ref.get((r.backend, r.batch))
            row.append(f"{base / r.median_ms:.2f}x" if base else "–")
        cells.append(row)
    return markdown_table(header, cells)
