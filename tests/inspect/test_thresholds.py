"""Thresholds from good images only (a quantile of held-out normal scores, the false-alarm rate reported) and the
normalised score (anomalib's min-max convention), the same in eager, the CSV and the exported bundle."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from potpourri.cli import main
from potpourri.inspect.base import Thresholds, calibrate_on_normal

pytestmark = pytest.mark.one_thread


def test_the_quantile_threshold_and_the_reported_rate():
    scores = np.arange(100, dtype=float)  # 0 .. 99
    maps = np.zeros((100, 4, 4))
    maps[:, 0, 0] = scores / 10  # per-image maxima 0.0 .. 9.9
    t = calibrate_on_normal(scores, maps, false_alarm_rate=0.05)
    assert t.image == 95.0 and t.pixel == pytest.approx(9.5)  # the 0.95 quantile ("higher") of each
    assert (t.image_min, t.image_max, t.false_alarm_rate) == (0.0, 99.0, 0.05)
    assert "100 held-out normal images" in t.notes[0] and "0.05 of them at or above it" in t.notes[0]
    few = calibrate_on_normal(scores[:10], maps[:10], false_alarm_rate=0.01)
    assert "below 1/10 cannot be checked" in few.notes[-1]
    assert not calibrate_on_normal(scores[:1], maps[:1], 0.01).calibrated


def test_normalised_score_is_half_at_the_threshold_and_clipped():
    t = Thresholds(image=5.0, pixel=5.0, image_min=1.0, image_max=9.0)
    assert t.normalise(5.0) == 0.5 and t.normalise(7.0) == 0.75 and t.normalise(100.0) == 1.0
    assert t.normalise(-100.0) == 0.0 and Thresholds().normalise(3.0) is None


def test_fit_on_good_images_only_calibrates_on_a_held_out_share(mvtec_folder, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(mvtec_folder / "train" / "good", good)  # 8 good images, no test folder, no labels
    run = tmp_path / "run"
    fit = ["inspect", "fit", "--data", str(good), "--image-size", "64", "--coreset-ratio", "0.5", "--threads", "1"]
    assert main([*fit, "--out", str(run), "--false-alarm-rate", "0.1"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["normal_holdout_images"] == 2 and summary["train_images"] == 6
    meta = json.loads((run / "metadata.json").read_text())
    thresholds = Thresholds(**meta["thresholds"])
    assert "quantile of held-out normal scores" in thresholds.source and thresholds.false_alarm_rate == 0.1
    images = sorted(str(p) for p in (mvtec_folder / "test").glob("*/*.png"))
    assert main(["inspect", "predict", "--run", str(run), *images, "--out", str(tmp_path / "p"), "--no-progress"]) == 0
    rows = list(csv.DictReader((tmp_path / "p" / "predictions.csv").open()))
    for row in rows:
        assert float(row["normalised"]) == pytest.approx(thresholds.normalise(float(row["score"])))
    defect = [float(r["score"]) for r in rows if "/square/" in r["image"]]
    normal = [float(r["score"]) for r in rows if "/good/" in r["image"]]
    assert min(defect) > max(normal)  # the planted squares score above every good test image
    assert all(r["label"] == "defect" for r in rows if "/square/" in r["image"])
