"""``potpourri reproduce defect-gen``: generators see only the seed's real images; the table covers every arm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from potpourri.core.errors import PotpourriError
from potpourri.papers import defect_gen as experiment
from potpourri.segment.copypaste import CopyPaste, CopyPasteConfig

pytestmark = pytest.mark.one_thread  # moved out of a one-thread folder: keep its thread count (tests/conftest.py)

SEEN: list[dict[str, np.ndarray]] = []


class SpyConfig(CopyPasteConfig):
    """CopyPaste's config (the spy takes the same options)."""


class Spy(CopyPaste):
    """Copy-paste that records what ``fit`` was given."""

    def fit(self, images, masks, normals=None, *, options=None):
        SEEN.append({"images": images.copy(), "masks": masks.copy(), "normals": normals.copy()})
        return super().fit(images, masks, normals)


def tiny(**overrides) -> experiment.DefectGenExperimentConfig:
    base = {"image_size": 32, "real_per_kind": 1, "n_normal": 2, "n_synthetic": 3, "pool_per_kind": 2,
            "test_per_kind": 1, "seeds": (0, 1, 2), "steps": 2, "batch_size": 4}  # fmt: skip
    return experiment.DefectGenExperimentConfig(**{**base, **overrides})


def test_generators_see_only_the_seeds_real_images_and_every_arm_is_reported(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(experiment.GENERATORS, "spy", f"{__name__}:Spy:SpyConfig")
    SEEN.clear()
    cfg = tiny(generators=("spy", "copy-paste"))
    run = experiment.reproduce_defectgen(cfg, out=tmp_path / "run")
    assert len(SEEN) == len(cfg.seeds)
    for seed, seen in zip(cfg.seeds, SEEN, strict=True):
        images, masks, normals = experiment._real_split(cfg, seed)  # the independent expectation
        np.testing.assert_array_equal(seen["images"], images)
        np.testing.assert_array_equal(seen["masks"], masks)
        np.testing.assert_array_equal(seen["normals"], normals)
        assert len(images) == 7 * cfg.real_per_kind and (masks.reshape(len(masks), -1) > 0).any(axis=1).all()
    summary = json.loads((run.path / "summary.json").read_text())
    assert [r["arm"] for r in summary["table"]] == ["real", "real + spy", "real + copy-paste"]
    assert len(summary["runs"]) == 3 * len(cfg.seeds)
    real = {r["seed"]: r["miou_defects"] for r in summary["runs"] if r["arm"] == "real"}
    spy = [r for r in summary["runs"] if r["arm"] == "real + spy"]
    paired = np.mean([r["miou_defects"] - real[r["seed"]] for r in spy])
    assert summary["table"][1]["delta_mean"] == pytest.approx(paired)
    results = (run.path / "results.md").read_text()
    assert "| real + copy-paste | 12 |" in results and "never on DS-Synth's procedural generator" in results
    assert (run.path / "report.html").is_file() and (run.path / "images" / "samples_copy-paste.png").is_file()


def test_real_split_draws_different_images_per_seed_from_the_training_rows() -> None:
    cfg = tiny()
    a, b = experiment._real_split(cfg, 0), experiment._real_split(cfg, 1)
    assert not np.array_equal(a[0], b[0])
    assert a[0].shape == (7, 32, 32, 3) and a[2].shape == (2, 32, 32, 3)


def test_a_missing_generator_module_is_skipped_with_a_note(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(experiment.GENERATORS, "ghost", "potpourri.inspect.no_such_module:Ghost:GhostConfig")
    run = experiment.reproduce_defectgen(tiny(generators=("ghost",), seeds=(0,)), out=tmp_path / "run")
    assert "arm 'real + ghost' skipped" in (run.path / "results.md").read_text()
    with pytest.raises(PotpourriError, match="not in this potpourri"):
        experiment.make_generator("ghost")
    with pytest.raises(PotpourriError, match="unknown generator 'nope'"):
        experiment.make_generator("nope")
