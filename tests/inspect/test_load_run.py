"""``potpourri predict --run`` and ``potpourri.load_run`` take an inspection run too: the same scores as
``inspect predict``, one ``predict(images)`` contract."""

from __future__ import annotations

import csv

import pytest

from potpourri import load_run
from potpourri.cli import main

pytestmark = pytest.mark.one_thread


def test_predict_run_of_an_inspection_run_and_load_run_agree(mvtec_folder, tmp_path):
    run = tmp_path / "run"
    fit = ["inspect", "fit", "--data", str(mvtec_folder), "--image-size", "64", "--coreset-ratio", "0.5"]
    assert main([*fit, "--out", str(run), "--threads", "1"]) == 0
    test_images = sorted((mvtec_folder / "test").glob("*/*.png"))
    assert main(["predict", "--run", str(run), *map(str, test_images), "--out", str(tmp_path / "p")]) == 0
    rows = {r["image"]: float(r["score"]) for r in csv.DictReader((tmp_path / "p" / "predictions.csv").open())}
    predictor = load_run(run)
    assert predictor.kind == "inspection"
    results = predictor.predict(test_images)
    assert [rows[str(p)] for p in test_images] == pytest.approx([r.score for r in results], rel=1e-6)
    assert {r.label for r in results} == {True, False}  # calibrated: the planted squares are flagged
