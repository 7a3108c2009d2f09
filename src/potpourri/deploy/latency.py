"""One latency protocol for the whole project: pinned threads, warm-up, interleaved rounds, median and spread.

Interleaving (A, B, C, A, B, C, …) makes drift and a busy neighbour hit every candidate alike; the load average
is logged before and after so a noisy run can be recognised.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from potpourri.core.errors import PotpourriError
from potpourri.core.timing import interleaved_timings, quartiles
from potpourri.report.tables import markdown_table

__all__ = ["LatencyRow", "bench_models", "latency_table"]

BACKENDS = ("eager", "onnxruntime")


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


def _eager_call(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def call() -> Any:
        with torch.inference_mode():
            return model(x)

    return call


def _onnx_call(model: torch.nn.Module, x: torch.Tensor, threads: int, folder: str, name: str) -> Callable[[], Any]:
    from potpourri.deploy.export import export_onnx, ort_session

    result = export_onnx(model, folder, input_size=tuple(x.shape[1:]), name=name.replace("/", "_"))
    session = ort_session(result.onnx_path, threads)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


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
) -> tuple[list[LatencyRow], dict[str, Any]]:
    """Time every model × backend × batch in one interleaved protocol; returns rows and the run's conditions.

    ``reparam`` adds a ``<name>+reparam`` candidate for each model. ``models`` may pass pre-built modules by name.
    Example:
        rows, conditions = bench_models(["efficientmod_xxs", "repconvnet_s"], batches=[1, 8], reparam=True)
    """
    from potpourri.core.registry import create_model
    from potpourri.models.reparam import reparameterize

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise PotpourriError(f"unknown backend '{unknown[0]}'; choose from {', '.join(BACKENDS)}")
    if threads < 1 or threads > (os.cpu_count() or 1):
        raise PotpourriError(f"--threads {threads} is outside 1..{os.cpu_count()} (cores on this machine)")
    torch.set_num_threads(threads)
    built: dict[str, torch.nn.Module] = {}
    for name in names:
        model = (models or {}).get(name) or create_model(name, pretrained=False)
        built[name] = model.eval()
        if reparam:
            built[f"{name}+reparam"] = reparameterize(model)
    rows: list[LatencyRow] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        for batch in batches:
            x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
            candidates: dict[tuple[str, str], Callable[[], Any]] = {}
            for name, model in built.items():
                for backend in backends:
                    if backend == "eager":
                        candidates[(name, backend)] = _eager_call(model, x)
                    else:
                        candidates[(name, backend)] = _onnx_call(model, x, threads, folder, f"{name}_{batch}")
            keyed = {f"{n}|{b}": call for (n, b), call in candidates.items()}
            timings = interleaved_timings(keyed, rounds=rounds)
            for key, values in timings.items():
                name, backend = key.split("|")
                q1, median, q3 = quartiles(values)
                rows.append(
                    LatencyRow(name, backend, batch, threads, median * 1e3, q1 * 1e3, q3 * 1e3, batch / median, rounds)
                )
    conditions = {
        "threads": threads,
        "image_size": image_size,
        "rounds": rounds,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    return rows, conditions


def latency_table(rows: Sequence[LatencyRow], *, reference: str | None = None) -> str:
    """A Markdown table of the rows; with ``reference``, a column of speed-ups against it (same backend, batch)."""
    ref = {(r.backend, r.batch): r.median_ms for r in rows if r.model == reference}
    header = ["model", "backend", "batch", "median ms", "IQR ms", "images/s"] + (["speed-up"] if reference else [])
    cells = []
    for r in rows:
        row = [
            r.model,
            r.backend,
            r.batch,
            f"{r.median_ms:.2f}",
            f"{r.q1_ms:.2f}–{r.q3_ms:.2f}",
            f"{r.images_per_s:.1f}",
        ]
        if reference:
            base = ref.get((r.backend, r.batch))
            row.append(f"{base / r.median_ms:.2f}x" if base else "–")
        cells.append(row)
    return markdown_table(header, cells)
