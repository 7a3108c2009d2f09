"""Benchmark timing: interleaved rounds across candidates, median and quartiles; page faults and the allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def interleaved_timings(
    candidates: dict[str, Callable[[], Any]], *, warmup: int = 2, rounds: int = 10, min_time_s: float = 0.05
) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one entry per round, with rounds interleaved across candidates.

    Each round repeats a call until ``min_time_s`` has passed, so short calls are not lost in timer noise.
    """
    for call in candidates.values():
        for _ in range(warmup):
            call()
    timings: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, call in candidates.items():
            calls, start = 0, time.perf_counter()
            while True:
                call()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_time_s:
                    break
            timings[name].append(elapsed / calls)
    return timings


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, statistics.median(values), q3


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def retain_freed_memory(*, mmap_threshold_mb: int = 256, trim_threshold_mb: int = 1024) -> bool:
    """Make glibc keep freed blocks for reuse instead of returning them to the OS (process-wide, for benchmarks).

    By default glibc serves blocks over 128 KiB (a threshold that adapts upwards) by ``mmap`` and unmaps them when
    freed, so a model whose activations are megabytes (EfficientMod's stride-4 stage) page-faults every one of them
    in again on each forward; PyTorch's CPU allocator does not cache. Returns False (nothing changed) where libc is
    not glibc.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_set = mallopt(_M_MMAP_THRESHOLD, mmap_threshold_mb << 20)
    return bool(mmap_set and mallopt(_M_TRIM_THRESHOLD, trim_threshold_mb << 20))


def page_faults_per_call(call: Callable[[], Any], *, calls: int = 3) -> float:
    """Minor page faults of this process per call of ``call`` (after one warm-up call): memory the OS had to map."""
    call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        call()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls
