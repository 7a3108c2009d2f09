"""DS-Synth v2: the v1 bytes are untouched, every type shares one ink distribution, types differ by shape."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from potpourri.core.errors import PotpourriError
from potpourri.data.synth import CATEGORIES, CLASSES, DEFECTS, MULTI, make_sample, make_task
from potpourri.data.synth_shapes import apply_ink, draw_ink

# sha256 of 16 v1 samples made by the generator before v2 existed (commit a264762): old runs stay reproducible
V1_DIGEST = "b749386df6f74453d59bb7b3b0aea280f3f8443a3dfed1c2aa00c5918eebb5ae"


def test_version_1_bytes_are_unchanged_by_v2() -> None:
    digest = hashlib.sha256()
    for kind in (*CLASSES, MULTI):
        for category in ("brick", "tissue"):
            s = make_sample(category, "test", kind, 1, size=64)
            digest.update(s.image.tobytes())
            digest.update(s.mask.tobytes())
            digest.update(s.caption.encode())
    assert digest.hexdigest() == V1_DIGEST


@pytest.mark.parametrize("category", list(CATEGORIES))
@pytest.mark.parametrize("kind", (*CLASSES, MULTI))
def test_v2_pixels_outside_the_mask_are_clean_and_the_mask_holds_the_kind(category: str, kind: str) -> None:
    s = make_sample(category, "test", kind, 0, size=64, version="2")
    outside = s.mask == 0
    np.testing.assert_array_equal(s.image[outside], s.clean[outside])
    present = {CLASSES[k] for k in np.unique(s.mask) if k}
    if kind == "good":
        assert not present and "no defect" in s.caption
    elif kind == MULTI:
        assert len(present) >= 2
    else:
        assert present == {kind}
        changed = (s.image[~outside] != s.clean[~outside]).any(axis=1).mean()
        assert changed > 0.8, changed


def test_v2_is_deterministic_and_differs_from_v1() -> None:
    a = make_sample("grass", "train", "crack", 3, size=64, version="2")
    b = make_sample("grass", "train", "crack", 3, size=64, version="2")
    v1 = make_sample("grass", "train", "crack", 3, size=64)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.clean, v1.clean)  # same crop: only the painted defect changes
    assert not np.array_equal(a.mask, v1.mask)


def _ink_statistics(kind: str, version: str, n: int = 40) -> tuple[float, float]:
    """(share of darker defects, mean mask area) over ``n`` samples of ``kind``."""
    darker, area = [], []
    for index in range(n):
        s = make_sample("gravel", "train", kind, index, size=64, version=version)
        inside = s.mask > 0
        darker.append((s.image[inside].astype(float) - s.clean[inside].astype(float)).mean() < 0)
        area.append(inside.mean())
    return float(np.mean(darker)), float(np.mean(area))


@pytest.mark.slow
def test_every_defect_type_draws_the_same_ink_and_a_closer_area_than_v1() -> None:
    v2 = {kind: _ink_statistics(kind, "2") for kind in DEFECTS}
    v1 = {kind: _ink_statistics(kind, "1") for kind in DEFECTS}
    for kind, (darker, _) in v2.items():
        assert 0.25 <= darker <= 0.75, (kind, darker)  # half darker, half lighter, whatever the type
    assert v1["hole"][0] == 1.0  # v1 holes are always dark: the colour alone gives them away
    spread = {v: max(a for _, a in s.values()) / min(a for _, a in s.values()) for v, s in (("1", v1), ("2", v2))}
    assert spread["2"] < 3.0 and spread["2"] < spread["1"], spread  # measured: 2.5 vs 4.7


def test_ink_is_drawn_without_looking_at_the_type_and_grows_with_severity() -> None:
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert draw_ink(rng_a) == draw_ink(rng_b)
    strengths = [np.mean([draw_ink(np.random.default_rng(i), s)[1] for i in range(200)]) for s in (0.2, 0.5, 0.9)]
    assert strengths[0] < strengths[1] < strengths[2]
    image = np.full((4, 4, 3), 0.5, np.float32)
    alpha = np.zeros((4, 4), np.float32)
    alpha[1, 1] = 1.0
    out = apply_ink(image, alpha, (True, 0.4, "neutral"))
    np.testing.assert_allclose(out[1, 1], 0.3)  # darker by 40 % where covered
    np.testing.assert_array_equal(out[0, 0], image[0, 0])  # untouched elsewhere


def test_unknown_version_is_a_one_line_error() -> None:
    with pytest.raises(PotpourriError, match="unknown DS-Synth version '3'; choose from 1, 2"):
        make_sample("brick", "test", "hole", 0, version="3")
    with pytest.raises(PotpourriError, match="unknown DS-Synth version"):
        make_task("classification", n_per_class=1, size=32, version="v2")


def test_tune_reads_the_pinned_v2_benchmark_by_name() -> None:
    from potpourri.data.synth import BENCHMARK_V2
    from potpourri.tune.data import load_image_data

    train, val, classes = load_image_data("ds-synth-v2:classification:brick", img_size=32, mean=(0.5,) * 3,
                                          std=(0.5,) * 3)  # fmt: skip
    assert classes == list(CLASSES)
    assert len(train) == len(val) == BENCHMARK_V2["n_per_class"] * len(CLASSES)
    direct = make_task("classification", categories=("brick",), size=32, **BENCHMARK_V2)
    image, label = train[3]
    expected = (direct.train_images[3].astype(np.float32) / 255 - 0.5) / 0.5  # normalised with mean = std = 0.5
    np.testing.assert_allclose(image.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert label == direct.train_labels[3]
    v1_train, _, _ = load_image_data("ds-synth:classification:brick", img_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert len(v1_train) == 10 * len(CLASSES)  # v1 keeps its old settings under its old name


def test_synth_writes_v2_files_that_hold_the_in_memory_samples(tmp_path) -> None:
    from PIL import Image

    from potpourri.cli import main

    out = tmp_path / "ds"
    argv = ["synth", "--out", str(out), "--image-size", "48", "--per-class", "1", "--categories", "brick"]
    assert main([*argv, "--dataset-version", "2", "--workers", "1"]) == 0
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset_version"] == "2" and manifest["generator_version"] == "2.0"
    written = np.asarray(Image.open(out / "MVTec-Synth/brick/test/hole/000.png"))
    np.testing.assert_array_equal(written, make_sample("brick", "test", "hole", 0, size=48, version="2").image)
    assert main([*argv, "--dataset-version", "3"]) == 2  # unknown version: refused at parse time
