"""Interleaved benchmark timing, checked against a planted clock."""

from __future__ import annotations

import pytest

from potpourri.core import timing
from potpourri.core.timing import interleaved_timings


def test_interleaved_timings_with_a_planted_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    calls: list[str] = []

    def fake_clock() -> float:
        return clock[0]

    def make(name: str, seconds: float):
        def call() -> None:
            calls.append(name)
            clock[0] += seconds

        return call

    monkeypatch.setattr(timing.time, "perf_counter", fake_clock)
    timings = interleaved_timings({"a": make("a", 0.03), "b": make("b", 0.1)}, warmup=1, rounds=3, min_time_s=0.05)
    assert timings["a"] == pytest.approx([0.03] * 3) and timings["b"] == pytest.approx([0.1] * 3)
    # after one warm-up each, rounds alternate: a runs twice (to pass 50 ms), then b once
    assert calls == ["a", "b"] + ["a", "a", "b"] * 3
