"""End-to-end demo: DS-Synth, pretrained features, linear probe vs histogram, latency, report; same seed → same."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from potpourri.papers.demo import run_demo, summary_lines, tuning_story


@pytest.mark.slow
def test_demo_end_to_end_is_reproducible(tmp_path: Path) -> None:
    first = run_demo(
        tmp_path / "a", seed=0, n_per_class=4, image_size=64, latency_rounds=1, tune_epochs=1, segment_steps=20
    )
    second = run_demo(
        tmp_path / "b",
        seed=0,
        n_per_class=4,
        image_size=64,
        latency_rounds=0,
        inspect=False,
        tune_epochs=1,
        segment_steps=20,
    )
    a, b = first.read_summary(), second.read_summary()
    assert a["probe_accuracy"] == b["probe_accuracy"] and a["confusion_matrix"] == b["confusion_matrix"]
    assert a["histogram_accuracy"] == b["histogram_accuracy"]
    assert [r["val accuracy"] for r in a["tuning"]] == [r["val accuracy"] for r in b["tuning"]]  # seeded training
    assert [r["strategy"] for r in a["tuning"]] == ["linear", "subtuning", "full-adamw"]
    assert a["probe_accuracy"] > 1 / 7  # above chance for 7 classes, even at this tiny scale
    assert {row["model"] for row in a["latency"]} >= {"repconvnet_s (multi-branch)", "repconvnet_s (re-parameterised)"}
    html = (first.path / "report.html").read_text()
    pictures = re.findall(r'src="([^"]+)"', html)
    assert len(pictures) >= 2 and all((first.path / p).is_file() for p in pictures)
    assert "CPU latency" in html and "PatchCore" in html
    assert 0.0 <= a["inspection"]["pixel_auroc"] <= 1.0 and a["inspection"]["category"] == "brick"
    assert a["segmentation"]["miou"] == b["segmentation"]["miou"]  # seeded segmenter training
    assert "Defect segmentation" in html and (first.path / "images" / "segmentation.png").is_file()
    for name in ("config.yaml", "env.json", "metrics.csv", "summary.json"):
        assert (first.path / name).is_file()
    lines = summary_lines(a)
    assert f"{a['probe_accuracy']:.3f}" in lines[0] and f"{a['histogram_accuracy']:.3f}" in lines[0]
    assert [line.split()[1] for line in lines[1:4]] == ["linear", "subtuning", "full-adamw"]
    assert f"{a['inspection']['image_auroc']:.3f}" in "\n".join(lines)


def test_tuning_story_states_gains_and_costs_from_the_rows() -> None:
    rows = [
        {"strategy": "linear", "val accuracy": 0.60, "trainable params": 9_000, "train seconds": 2.0},
        {"strategy": "subtuning", "val accuracy": 0.75, "trainable params": 1_089_000, "train seconds": 20.0},
        {"strategy": "full-adamw", "val accuracy": 0.70, "trainable params": 3_380_000, "train seconds": 60.0},
    ]
    story = tuning_story(rows)
    assert "subtuning gains 0.150 over linear for 121x the trainable parameters and 10.0x the training time" in story
    assert "full-adamw loses 0.050 over subtuning for 3x the trainable parameters and 3.0x" in story
