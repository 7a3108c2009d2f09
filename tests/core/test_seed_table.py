"""``core.results.mean_std`` against numpy, and ``benchmarks/seed_table.py`` on planted run folders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from potpourri.core.results import mean_std

ROOT = Path(__file__).resolve().parents[2]


def _seed_table():
    spec = importlib.util.spec_from_file_location("seed_table", ROOT / "benchmarks" / "seed_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mean_std_is_the_sample_std_of_numpy() -> None:
    values = [0.25, 0.5, 0.875]
    expected = f"{np.mean(values):.3f}±{np.std(values, ddof=1):.3f}"
    assert mean_std(values) == expected
    assert mean_std([0.1234]) == "0.123" and mean_std([]) == "—"
    assert mean_std([1.0, 3.0], sep=" ± ", digits=1) == "2.0 ± 1.4"


def test_seed_table_reads_dotted_paths_and_refuses_a_missing_key(tmp_path, capsys) -> None:
    module = _seed_table()
    runs = []
    for seed, value in enumerate((0.2, 0.4, 0.9)):
        run = tmp_path / f"s{seed}"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"stages": [{"m": {"acc": 0.0}}, {"m": {"acc": value}}]}))
        runs.append(str(run))
    assert module.main([f"A={','.join(runs)}", "--key", "last acc=stages.-1.m.acc"]) == 0
    header, _, row = capsys.readouterr().out.strip().splitlines()
    assert header == "| arm | seeds | last acc |"
    assert (
        row
        == f"| A | 3 | {np.mean([0.2, 0.4, 0.9]):.3f} ± {np.std([0.2, 0.4, 0.9], ddof=1):.3f} (0.200, 0.400, 0.900) |"
    )
    assert module.main([f"A={runs[0]}", "--key", "stages.-1.m.loss"]) == 2
    with pytest.raises(SystemExit):
        module.main([f"A={tmp_path / 'nowhere'}", "--key", "x"])


def test_anomalib_paired_table_counts_a_repeated_seed_once_and_refuses_a_disagreeing_one(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("paired", ROOT / "benchmarks" / "anomalib_paired_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def row(seed: int, theirs: float, ours: float) -> dict:
        return {"set": "s", "seed": seed, "anomalib": dict.fromkeys(module.METRICS, theirs),
                "old": dict.fromkeys(module.METRICS, ours), "ours": dict.fromkeys(module.METRICS, ours)}  # fmt: skip

    (tmp_path / "a.json").write_text(json.dumps([row(0, 0.5, 0.6), row(1, 0.7, 0.6)]))
    (tmp_path / "b.json").write_text(json.dumps({"rows": [row(1, 0.7, 0.6), row(2, 0.8, 0.8)]}))
    assert module.main([f"{tmp_path / 'a.json'}:old", str(tmp_path / "b.json")]) == 0
    first = capsys.readouterr().out.splitlines()[2]
    theirs, ours, diffs = [0.5, 0.7, 0.8], [0.6, 0.6, 0.8], [0.1, -0.1, 0.0]  # seed 1 counted once
    cells = [f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}" for v in (theirs, ours)]
    cells.append(f"{np.mean(diffs):+.3f} ± {np.std(diffs, ddof=1):.3f}")
    assert first == "| s (3) | image_auroc | " + " | ".join(cells) + " |"
    (tmp_path / "c.json").write_text(json.dumps([row(1, 0.7, 0.65)]))
    with pytest.raises(SystemExit, match="different metrics"):
        module.main([str(tmp_path / "b.json"), str(tmp_path / "c.json")])
