"""Runs written before the folder re-layout (potpourri 0.1.0, December 2026) still load and predict the same.

``tests/fixtures/old_layout/patchcore_v0.1.0`` was written by ``potpourri inspect fit --data ds-synth:brick
--image-size 64 --coreset-ratio 0.05 --threads 1`` with the old layout (reports and images left out);
``expected.json`` holds the old code's scores on three crops of scikit-image's brick photo (the third with a planted
white square).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from potpourri.cli import main
from potpourri.inspect import load_method

pytestmark = pytest.mark.one_thread
RUN = Path(__file__).resolve().parents[1] / "fixtures" / "old_layout" / "patchcore_v0.1.0"


def _crops(expected: dict) -> list[np.ndarray]:
    brick = data.brick()
    crops = [np.stack([brick[r : r + 64, c : c + 64]] * 3, -1) for r, c in expected["crops"]]
    index, start, stop = expected["planted_square"]
    crops[index][start:stop, start:stop] = 255
    return crops


def test_old_patchcore_run_predicts_what_the_old_code_predicted():
    expected = json.loads((RUN / "expected.json").read_text())
    results = load_method(RUN).predict(_crops(expected))
    np.testing.assert_allclose([r.score for r in results], expected["scores"], rtol=1e-5)
    np.testing.assert_allclose([float(r.anomaly_map.sum()) for r in results], expected["map_sums"], rtol=1e-5)
    assert [r.label for r in results] == expected["labels"]


def test_old_patchcore_run_works_from_the_cli(tmp_path):
    expected = json.loads((RUN / "expected.json").read_text())
    paths = []
    for i, crop in enumerate(_crops(expected)):
        paths.append(str(tmp_path / f"crop{i}.png"))
        Image.fromarray(crop).save(paths[-1])
    assert main(["inspect", "predict", str(RUN), *paths, "--out", str(tmp_path / "old")]) == 0  # old spelling
    assert main(["inspect", "predict", "--run", str(RUN), *paths, "--out", str(tmp_path / "new")]) == 0
    rows = (tmp_path / "new" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + len(paths)
    scores = [float(row.split(",")[1]) for row in rows[1:]]
    np.testing.assert_allclose(scores, expected["scores"], rtol=1e-5)
    assert rows == (tmp_path / "old" / "predictions.csv").read_text().splitlines()
