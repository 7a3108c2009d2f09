"""The inspection contract: typed results, threshold calibration, metadata.json beside safetensors, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from sklearn.metrics import f1_score

from potpourri.core.errors import PotpourriError
from potpourri.core.results import InspectionResult
from potpourri.inspect.base import FORMAT_VERSION, calibrate_thresholds, load_method


def test_calibration_uses_f1_max_threshold() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = rng.normal(labels * 1.5, 1.0)
    thresholds = calibrate_thresholds(scores, labels)
    candidates = [f1_score(labels, scores >= t) for t in scores]  # brute force over every possible cut
    assert thresholds.source == "f1-max on validation"
    assert f1_score(labels, scores >= thresholds.image) == pytest.approx(max(candidates))
    assert thresholds.pixel == thresholds.image and any("pixel threshold = image" in n for n in thresholds.notes)


def test_calibration_pixel_threshold_from_masks_and_user_values() -> None:
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[1, :2, :2] = 1
    maps = np.where(masks == 1, 0.9, 0.1) + np.linspace(0, 0.05, 16).reshape(4, 4)
    thresholds = calibrate_thresholds(np.array([0.2, 0.8]), np.array([0, 1]), maps, masks)
    assert ((maps >= thresholds.pixel) == masks.astype(bool)).all()  # perfectly separating pixel threshold
    user = calibrate_thresholds(np.array([0.2, 0.8]), np.array([0, 1]), image_threshold=0.5, pixel_threshold=0.7)
    assert (user.image, user.pixel, user.source) == (0.5, 0.7, "user")


def test_calibration_without_defects_takes_top_normal_score_with_note() -> None:
    thresholds = calibrate_thresholds(np.array([0.1, 0.4, 0.3]), np.array([0, 0, 0]))
    assert thresholds.image == 0.4 and any("no defects" in n for n in thresholds.notes)
    assert not calibrate_thresholds(np.array([]), np.array([])).calibrated


def test_predict_returns_thresholded_typed_results(fitted, planted) -> None:
    scores, maps = fitted.score(planted.test)
    fitted.calibrate(scores, planted.labels, maps, planted.masks)
    results = fitted.predict(planted.test)
    assert all(isinstance(r, InspectionResult) for r in results)
    assert [r.label for r in results] == [bool(s >= fitted.thresholds.image) for s in scores]
    assert [r.label for r in results] == planted.labels.astype(bool).tolist()  # planted data is separable
    np.testing.assert_array_equal(results[-1].mask, maps[-1] >= fitted.thresholds.pixel)


def test_save_load_round_trip_keeps_scores_and_thresholds(fitted, planted, tmp_path) -> None:
    scores, maps = fitted.score(planted.test)
    fitted.calibrate(scores, planted.labels, maps, planted.masks)
    fitted.save(tmp_path)
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["method"] == "patchcore" and metadata["thresholds"]["image"] == fitted.thresholds.image
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert list(fh.keys()) == ["memory_bank"]  # thresholds are data in metadata.json, not in the tensors
    loaded = load_method(tmp_path, expect="patchcore")
    assert loaded.config == fitted.config and loaded.thresholds == fitted.thresholds
    loaded_scores, loaded_maps = loaded.score(planted.test)
    np.testing.assert_allclose(loaded_scores, scores, rtol=1e-6)
    np.testing.assert_allclose(loaded_maps, maps, rtol=1e-6, atol=1e-6)


def test_load_rejects_foreign_folders(tmp_path, fitted) -> None:
    with pytest.raises(PotpourriError, match="not an inspection run"):
        load_method(tmp_path)
    fitted.save(tmp_path)
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    with pytest.raises(PotpourriError, match="not 'anomalyclip'"):
        load_method(tmp_path, expect="anomalyclip")
    (tmp_path / "metadata.json").write_text(json.dumps({**metadata, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(PotpourriError, match="refit with this version"):
        load_method(tmp_path)
