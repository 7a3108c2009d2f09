"""The roofline: how close a model's forward pass comes to what this CPU can do at a thread count.

Williams, Waterman & Patterson, "Roofline: an insightful visual performance model for multicore architectures"
(CACM 2009): a kernel doing ``F`` FLOPs while moving ``Q`` bytes cannot finish faster than
``max(F / peak, Q / bandwidth)``; its attainable rate is ``min(peak, bandwidth × F/Q)``.

Reading order: ``Roof`` (the arithmetic) → ``measure_peaks`` (the machine) → ``layer_costs`` (the model, per layer)
→ ``layer_times`` (eager time per layer) → ``roofline_rows`` / tables (what ``potpourri bench --roofline`` prints).

The cost model, per layer (a module's own aten ops, in eval mode, as PyTorch eager runs them):
- FLOPs: ``torch.utils.flop_counter`` (2 × multiply-accumulates of convolutions, matmuls and fused attention; via
  ``core.registry.flop_counter``); element-wise ops (BN, activations, adds) count 0 FLOPs.
- bytes: for every op that moves data, each distinct input tensor read once plus each output written once (weights
  and biases are inputs), at their element size (4 for fp32). Views (reshape, permute, split …) and allocations
  move nothing; an expanded tensor is read at its storage size. No cache reuse between ops, no fusion: the bytes an
  unfused eager forward pass must touch at least once per op.
- time bound of a layer: ``max(FLOPs / peak, bytes / bandwidth)``; the model's bound is the sum over its layers.
  With DRAM bandwidth this bound is pessimistic for activations that stay in cache (batch 1, small maps), so an
  achieved fraction above 100 % means the layer ran from cache; the cache-bandwidth roof is the optimistic end.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from potpourri.core.errors import PotpourriError
from potpourri.core.timing import interleaved_timings
from potpourri.report.tables import markdown_table

__all__ = [
    "LayerCost",
    "MachinePeaks",
    "ModelCost",
    "Roof",
    "RooflineReport",
    "below_bound",
    "layer_costs",
    "layer_times",
    "measure_peaks",
    "model_cost",
    "peaks_line",
    "per_layer_table",
    "roofline_report",
    "roofline_rows",
    "roofline_table",
]

GIGA = 1e9
# ops that alias or allocate without moving data (views are found by their schema; these are not marked as views)
_NO_TRAFFIC = {"_unsafe_view", "empty", "empty_like", "empty_strided", "detach", "lift_fresh", "alias"}


@dataclass(frozen=True)
class Roof:
    """A compute peak (GFLOP/s) and a memory bandwidth (GB/s): the two lines of a roofline."""

    peak_gflops: float
    bandwidth_gbs: float

    @property
    def ridge(self) -> float:
        """The arithmetic intensity (FLOP/byte) where memory-bound turns compute-bound."""
        return self.peak_gflops / self.bandwidth_gbs

    def attainable_gflops(self, intensity: float) -> float:
        """The roofline bound ``min(peak, bandwidth × intensity)`` in GFLOP/s."""
        return min(self.peak_gflops, self.bandwidth_gbs * intensity)

    def time_s(self, flops: float, n_bytes: float) -> float:
        """The shortest time a kernel of ``flops`` FLOPs moving ``n_bytes`` bytes can take."""
        return max(flops / (self.peak_gflops * GIGA), n_bytes / (self.bandwidth_gbs * GIGA))


@dataclass(frozen=True)
class MachinePeaks:
    """This CPU at a thread count: fp32 matmul peak, DRAM bandwidth and cache (L2-sized arrays) bandwidth."""

    threads: int
    matmul_gflops: float
    bandwidth_gbs: float
    cache_bandwidth_gbs: float
    matmul_size: int
    stream_mib: float
    cache_kib: float
    matmul_engine: str = "torch.mm"  # the engine whose sgemm set the peak

    def roof(self, *, cache: bool = False) -> Roof:
        """The roofline with DRAM bandwidth (default) or with the cache bandwidth."""
        return Roof(self.matmul_gflops, self.cache_bandwidth_gbs if cache else self.bandwidth_gbs)


def _median_giga_rate(calls: dict[str, tuple[Callable[[], Any], float]], reps: int, min_time_s: float) -> dict:
    """``{name: work / median seconds / 1e9}`` for ``{name: (call, work per call)}``, rounds interleaved."""
    timings = interleaved_timings(
        {k: call for k, (call, _) in calls.items()}, warmup=1, rounds=reps, min_time_s=min_time_s
    )
    return {k: calls[k][1] / statistics.median(v) / GIGA for k, v in timings.items()}


def _stream_bandwidth(n_floats: int, reps: int, min_time_s: float) -> float:
    """STREAM-style copy (2 arrays) and triad (3 arrays) over ``n_floats`` fp32 each; the faster, in GB/s."""
    a, b, c = (torch.rand(n_floats) for _ in range(3))
    size = n_floats * 4
    calls = {
        "copy": (lambda: a.copy_(b), 2 * size),  # read b, write a (STREAM counting: no write-allocate)
        "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 3 * size),
    }
    return max(_median_giga_rate(calls, reps, min_time_s).values())


def _onnxruntime_matmul(n: int, threads: int) -> Callable[[], Any] | None:
    """An (n, n) @ (n, n) fp32 MatMul through ONNX Runtime at ``threads`` threads; None without onnxruntime / onnx."""
    try:
        from onnx import TensorProto, helper

        from potpourri.deploy.export import ort_session, require_onnxruntime

        require_onnxruntime()
    except (ImportError, PotpourriError):
        return None
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in ("a", "b")]
    output = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    session = ort_session(model.SerializeToString(), threads)
    rng = np.random.default_rng(0)
    feed = {"a": rng.random((n, n), dtype=np.float32), "b": rng.random((n, n), dtype=np.float32)}
    return lambda: session.run(None, feed)


def measure_peaks(
    threads: int = 1,
    *,
    sizes: Sequence[int] = (256, 512, 1024, 2048),
    stream_mib: float = 256,
    cache_kib: float = 256,
    reps: int = 5,
    min_time_s: float = 0.05,
) -> MachinePeaks:
    """Measure the fp32 matmul peak (best of ``torch.mm`` and ONNX Runtime's MatMul over ``sizes``, median of ``reps``)
    and copy/triad bandwidth at ``threads`` threads.

    The cache bandwidth is what torch ops reach on L2-sized arrays, per-call overhead included.

    Example:
        peaks = measure_peaks(threads=1); print(peaks.matmul_gflops, peaks.bandwidth_gbs)
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        calls = {}
        for n in sizes:
            a, b, out = torch.rand(n, n, generator=generator), torch.rand(n, n, generator=generator), torch.empty(n, n)
            calls[str(n)] = ((lambda a=a, b=b, out=out: torch.mm(a, b, out=out)), 2 * n**3)
        for n in sizes:  # torch's MKL sgemm takes its AVX2 path on AMD CPUs; ONNX Runtime's MLAS does not
            call = _onnxruntime_matmul(n, threads)
            if call is not None:
                calls[f"onnxruntime {n}"] = (call, 2 * n**3)
        matmul = _median_giga_rate(calls, reps, min_time_s)  # FLOP/s / 1e9 = GFLOP/s
        best = max(matmul, key=matmul.get)
        engine, _, size = best.rpartition(" ")
        dram = _stream_bandwidth(int(stream_mib * 2**20 / 4), reps, min_time_s)
        cache = _stream_bandwidth(int(cache_kib * 2**10 / 4 / 3), reps, min_time_s)  # 3 arrays fit in cache_kib
    finally:
        torch.set_num_threads(previous)
    return MachinePeaks(threads, matmul[best], dram, cache, int(size), stream_mib, cache_kib, engine or "torch.mm")


def peaks_line(peaks: MachinePeaks) -> str:
    """One line: the machine's roofs and ridge point."""
    return (
        f"machine at {peaks.threads} thread(s): fp32 matmul peak {peaks.matmul_gflops:.1f} GFLOP/s "
        f"({peaks.matmul_engine} {peaks.matmul_size}²), memory bandwidth {peaks.bandwidth_gbs:.1f} GB/s "
        f"({peaks.stream_mib:g} MiB arrays; ridge {peaks.roof().ridge:.1f} FLOP/B), cache bandwidth "
        f"{peaks.cache_bandwidth_gbs:.1f} GB/s ({peaks.cache_kib:g} KiB)"
    )


# ---------------------------------------------------------------------------------------------- per-layer costs


@dataclass
class LayerCost:
    """FLOPs and bytes of one module's own ops (``kind`` ends in ``(own ops)`` for a container's functional ops)."""

    name: str
    kind: str
    flops: int = 0
    bytes: int = 0
    ops: int = 0

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else 0.0


@dataclass
class ModelCost:
    """A model's per-layer costs at one input shape; totals and the time bound on a ``Roof``."""

    model: str
    input_shape: tuple[int, ...]
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else 0.0

    def bound_s(self, roof: Roof) -> float:
        """Sum over layers of ``max(FLOPs / peak, bytes / bandwidth)``."""
        return sum(roof.time_s(layer.flops, layer.bytes) for layer in self.layers)


def _stored_bytes(t: torch.Tensor) -> int:
    elements = min(t.numel(), t.untyped_storage().nbytes() // t.element_size())  # an expand reads its storage once
    return elements * t.element_size()


def _distinct_tensors(tree: Any) -> list[torch.Tensor]:
    seen, tensors = set(), []
    for t in tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
            if key not in seen:
                seen.add(key)
                tensors.append(t)
    return tensors


class _ModuleStack:
    """Forward pre/post hooks on every module that keep the name of the innermost running one."""

    def __init__(self, model: nn.Module, on_enter: Callable | None = None, on_exit: Callable | None = None) -> None:
        self.names: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name, on_enter)))
            self.handles.append(module.register_forward_hook(self._exit(name, on_exit), always_call=True))

    def _enter(self, name: str, callback: Callable | None) -> Callable:
        def hook(*_: Any) -> None:
            self.names.append(name)
            if callback:
                callback(name)

        return hook

    def _exit(self, name: str, callback: Callable | None) -> Callable:
        def hook(*_: Any) -> None:
            if callback:
                callback(name)
            self.names.pop()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _CostMode(TorchDispatchMode):
    """Charges every aten op's FLOPs (from the flop counter beneath) and bytes to the innermost running module."""

    def __init__(self, counter: Any, stack: _ModuleStack, layers: dict[str, LayerCost], kinds: dict[str, str]) -> None:
        super().__init__()
        self.counter, self.stack, self.layers, self.kinds = counter, stack, layers, kinds

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        if func.is_view or func.overloadpacket.__name__ in _NO_TRAFFIC:
            return out
        name = self.stack.names[-1] if self.stack.names else ""
        layer = self.layers.setdefault(name, LayerCost(name, self.kinds.get(name, "(outside modules)")))
        layer.flops += self.counter.get_total_flops() - before
        layer.bytes += sum(_stored_bytes(t) for t in _distinct_tensors((args, kwargs)))
        layer.bytes += sum(_stored_bytes(t) for t in _distinct_tensors(out))
        layer.ops += 1
        return out


def _kinds(model: nn.Module) -> dict[str, str]:
    return {
        name: type(m).__name__ + (" (own ops)" if any(True for _ in m.children()) else "")
        for name, m in model.named_modules()
    }


@torch.no_grad()
def layer_costs(model: nn.Module, x: torch.Tensor) -> list[LayerCost]:
    """FLOPs and bytes of each module's own ops in one eval forward pass on ``x``, in execution order.

    Example:
        for layer in layer_costs(model, torch.zeros(1, 3, 224, 224)): print(layer.name, layer.intensity)
    """
    from potpourri.core.registry import flop_counter

    model.eval()
    layers: dict[str, LayerCost] = {}
    stack = _ModuleStack(model)
    counter = flop_counter()
    try:
        with counter, _CostMode(counter, stack, layers, _kinds(model)):
            model(x)
    finally:
        stack.remove()
    return [layer for layer in layers.values() if layer.ops]


def model_cost(name: str, model: nn.Module, input_shape: tuple[int, ...]) -> ModelCost:
    """``layer_costs`` of ``model`` on zeros of ``input_shape``, as a ``ModelCost``."""
    return ModelCost(name, tuple(input_shape), layer_costs(model, torch.zeros(input_shape)))


@torch.no_grad()
def layer_times(model: nn.Module, x: torch.Tensor, *, rounds: int = 5, warmup: int = 2) -> dict[str, float]:
    """Median eager seconds spent in each module's own ops (its time minus its children's), hooks included.

    Example:
        times = layer_times(model, torch.zeros(1, 3, 224, 224)); slowest = max(times, key=times.get)
    """
    model.eval()
    started: list[list[float]] = []  # [start, children's seconds] per running module
    own: dict[str, float] = {}

    def enter(_: str) -> None:
        started.append([time.perf_counter(), 0.0])

    def leave(name: str) -> None:
        start, children = started.pop()
        elapsed = time.perf_counter() - start
        own[name] = own.get(name, 0.0) + elapsed - children
        if started:
            started[-1][1] += elapsed

    stack = _ModuleStack(model, enter, leave)
    samples: dict[str, list[float]] = {}
    try:
        for index in range(warmup + rounds):
            own.clear()
            model(x)
            if index >= warmup:
                for name, seconds in own.items():
                    samples.setdefault(name, []).append(seconds)
    finally:
        stack.remove()
    return {name: statistics.median(values) for name, values in samples.items()}


# ---------------------------------------------------------------------------------------------- the tables


def roofline_rows(
    costs: Sequence[ModelCost], rows: Sequence[Any], peaks: MachinePeaks, not_installed: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """One dict per (model, batch, backend): FLOPs, bytes, intensity, bound and measured ms, achieved fractions.

    ``rows`` are ``latency.LatencyRow``; ``costs`` are keyed by (model, batch) through their ``model`` and shape.
    """
    by_key = {(c.model, c.input_shape[0]): c for c in costs}
    dram, cache = peaks.roof(), peaks.roof(cache=True)
    out = []
    for row in rows:
        cost = by_key[(row.model, row.batch)]
        bound_ms = cost.bound_s(dram) * 1e3
        out.append(
            {
                "model": row.model,
                "batch": row.batch,
                "backend": row.backend,
                "gflop": cost.flops / GIGA,
                "mb_moved": cost.bytes / 1e6,
                "intensity": cost.intensity,
                "attainable_gflops": dram.attainable_gflops(cost.intensity),
                "bound_ms": bound_ms,
                "cache_bound_ms": cost.bound_s(cache) * 1e3,
                "median_ms": row.median_ms,
                "q1_ms": row.q1_ms,
                "q3_ms": row.q3_ms,
                "achieved_gflops": cost.flops / (row.median_ms * 1e-3) / GIGA,
                "achieved": bound_ms / row.median_ms,
            }
        )
    for cost in costs:
        for backend, why in (not_installed or {}).items():
            out.append({"model": cost.model, "batch": cost.input_shape[0], "backend": backend, "note": why})
    return out


def roofline_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per (model, batch, backend), achieved share of the DRAM and of the cache roofline bound."""
    header = ["model", "batch", "backend", "GFLOP", "MB moved", "FLOP/B", "bound ms", "cache bound ms", "median ms",
              "IQR ms", "GFLOP/s", "of bound", "of cache bound"]  # fmt: skip
    cells = []
    for r in rows:
        if "note" in r:
            cells.append([r["model"], r["batch"], r["backend"], *["–"] * 9, r["note"]])
            continue
        cells.append(
            [
                r["model"],
                r["batch"],
                r["backend"],
                f"{r['gflop']:.3f}",
                f"{r['mb_moved']:.1f}",
                f"{r['intensity']:.1f}",
                f"{r['bound_ms']:.2f}",
                f"{r['cache_bound_ms']:.2f}",
                f"{r['median_ms']:.2f}",
                f"{r['q1_ms']:.2f}–{r['q3_ms']:.2f}",
                f"{r['achieved_gflops']:.1f}",
                f"{r['achieved']:.0%}",
                f"{r['cache_bound_ms'] / r['median_ms']:.0%}",
            ]
        )
    return markdown_table(header, cells)


def per_layer_table(cost: ModelCost, roof: Roof, times: dict[str, float] | None = None, *, top: int = 10) -> str:
    """Markdown: the ``top`` layers by time bound, with what limits each and (given ``times``) eager time."""
    ranked = sorted(cost.layers, key=lambda layer: roof.time_s(layer.flops, layer.bytes), reverse=True)[:top]
    header = ["layer", "kind", "MFLOP", "KB", "FLOP/B", "limit", "bound µs"] + (
        ["eager µs", "of bound"] if times else []
    )
    cells = []
    for layer in ranked:
        bound = roof.time_s(layer.flops, layer.bytes)
        limit = "compute" if layer.intensity >= roof.ridge else "memory"
        row = [layer.name or "(model)", layer.kind, f"{layer.flops / 1e6:.2f}", f"{layer.bytes / 1e3:.1f}",
               f"{layer.intensity:.1f}", limit, f"{bound * 1e6:.1f}"]  # fmt: skip
        if times:
            measured = times.get(layer.name, math.nan)
            row += [f"{measured * 1e6:.1f}", f"{bound / measured:.0%}" if measured > 0 else "–"]
        cells.append(row)
    return markdown_table(header, cells)


@dataclass
class RooflineReport:
    """What ``bench --roofline`` prints and saves: the peaks line, the table, per-layer tables, JSON rows."""

    peaks: MachinePeaks
    rows: list[dict[str, Any]]
    per_layer: dict[str, str]  # "model @ batch B" -> Markdown table

    def text(self) -> str:
        """The whole report as Markdown."""
        parts = [peaks_line(self.peaks), "", roofline_table(self.rows)]
        for title, table in self.per_layer.items():
            parts += ["", f"{title}: top layers by time bound (eager time per layer, hooks included)", "", table]
        return "\n".join(parts)


def below_bound(rows: Sequence[dict[str, Any]], threshold: float = 0.6) -> list[tuple[str, int]]:
    """(model, batch) whose fastest backend reaches less than ``threshold`` of its bound."""
    best: dict[tuple[str, int], float] = {}
    for r in rows:
        if "achieved" in r:
            key = (r["model"], r["batch"])
            best[key] = max(best.get(key, 0.0), r["achieved"])
    return [key for key, achieved in best.items() if achieved < threshold]


def roofline_report(
    models: dict[str, nn.Module],
    latency_rows: Sequence[Any],
    peaks: MachinePeaks,
    *,
    image_size: int,
    not_installed: dict[str, str] | None = None,
    per_layer_top: int = 0,
    rounds: int = 5,
) -> RooflineReport:
    """Join latency rows with each model's per-layer costs; per-layer tables for models under 60 % of their bound.

    Example:
        report = roofline_report(built, rows, measure_peaks(1), image_size=224, per_layer_top=10); print(report.text())
    """
    batches = sorted({r.batch for r in latency_rows})
    costs = [model_cost(name, m, (b, 3, image_size, image_size)) for name, m in models.items() for b in batches]
    rows = roofline_rows(costs, latency_rows, peaks, not_installed)
    per_layer = {}
    if per_layer_top:
        by_key = {(c.model, c.input_shape[0]): c for c in costs}
        for name, batch in below_bound(rows):
            x = torch.zeros(by_key[(name, batch)].input_shape)
            times = layer_times(models[name], x, rounds=rounds)
            table = per_layer_table(by_key[(name, batch)], peaks.roof(), times, top=per_layer_top)
            per_layer[f"{name} @ batch {batch}"] = table
    return RooflineReport(peaks, rows, per_layer)
