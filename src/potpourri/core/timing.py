"""Benchmark timing: interleaved rounds across candidates, median and quartiles."""

from __future__ import annotations

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
