"""Corruption suite: shape, dtype, determinism, monotone severity, and agreement with imagecorruptions' formulas."""

from __future__ import annotations

import warnings
from functools import partial
from itertools import pairwise

import numpy as np
import pytest

from potpourri.core.errors import PotpourriError
from potpourri.data.corruptions import CORRUPTIONS, Corrupted, corrupt
from potpourri.data.layouts import DSSynth
from potpourri.data.synth import make_sample

IMAGE = make_sample("tissue", "test", "good", 0, size=64).image  # a colourful real-photo crop, (64, 64, 3) uint8
DETERMINISTIC = {"gaussian_blur", "defocus_blur", "zoom_blur", "brightness", "contrast", "saturate", "pixelate",
                 "jpeg_compression"}  # fmt: skip


def _change(out: np.ndarray) -> float:
    return float(np.abs(out.astype(np.float64) - IMAGE).mean())


def test_the_suite_is_imagenet_c() -> None:
    assert len(CORRUPTIONS) == 19


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_shape_dtype_determinism_and_monotone_severity(name: str) -> None:
    outs = [corrupt(IMAGE, name, s, seed=3) for s in range(1, 6)]
    for out in outs:
        assert out.shape == IMAGE.shape and out.dtype == np.uint8
    assert corrupt(IMAGE, name, 4, seed=3).tobytes() == outs[3].tobytes()
    if name not in DETERMINISTIC:  # random corruptions really depend on the seed
        assert corrupt(IMAGE, name, 4, seed=4).tobytes() != outs[3].tobytes()
    changes = [_change(out) for out in outs]
    assert changes[0] > 0.1
    assert all(b > a for a, b in pairwise(changes)), changes


def _reference(name: str, severity: int) -> np.ndarray:
    imagecorruptions = pytest.importorskip("imagecorruptions")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.random.seed(severity)  # imagecorruptions draws from the global generator ...
        noise = imagecorruptions.corruptions.sk.util.random_noise
        with pytest.MonkeyPatch.context() as patch:  # ... except impulse noise, which uses skimage's own generator
            patch.setattr(imagecorruptions.corruptions.sk.util, "random_noise", partial(noise, rng=severity))
            return np.asarray(imagecorruptions.corrupt(IMAGE, corruption_name=name, severity=severity), np.float64)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturate", "pixelate", "jpeg_compression"])
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_digital_corruptions_match_imagecorruptions_to_one_level(name: str, severity: int) -> None:
    ours = corrupt(IMAGE, name, severity).astype(np.float64)
    assert np.abs(ours - _reference(name, severity)).max() <= 1


@pytest.mark.parametrize("name", ["defocus_blur", "zoom_blur"])
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_blurs_match_imagecorruptions_closely(name: str, severity: int) -> None:
    ours = corrupt(IMAGE, name, severity).astype(np.float64)
    assert np.abs(ours - _reference(name, severity)).mean() < 3.0  # vs ~10-17 levels of change from the clean image


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [("gaussian_noise", 0.05), ("shot_noise", 0.05), ("impulse_noise", 0.1), ("speckle_noise", 0.05),
     ("motion_blur", 0.1), ("snow", 0.1)],
)  # fmt: skip
@pytest.mark.parametrize("severity", [1, 2])
def test_random_corruptions_change_as_much_as_imagecorruptions(name: str, tolerance: float, severity: int) -> None:
    ours, ref = _change(corrupt(IMAGE, name, severity)), _change(_reference(name, severity))
    assert abs(ours - ref) / ref < tolerance, (ours, ref)


def test_corrupted_wrapper_is_deterministic_per_index() -> None:
    base = DSSynth("brick", "test", 3, size=32)
    wrapped = Corrupted(base, "gaussian_noise", 2, seed=1)
    assert len(wrapped) == 3
    first, again = wrapped[0], wrapped[0]
    assert first.image.tobytes() == again.image.tobytes()
    assert first.image.tobytes() != wrapped[1].image.tobytes()
    np.testing.assert_array_equal(first.mask, base[0].mask)  # labels and masks pass through untouched
    expected_seed = int(np.random.SeedSequence([1, 0]).generate_state(1)[0])
    assert first.image.tobytes() == corrupt(base[0].image, "gaussian_noise", 2, seed=expected_seed).tobytes()


def test_bad_corruption_arguments() -> None:
    with pytest.raises(PotpourriError, match=r"unknown corruption 'rain'"):
        corrupt(IMAGE, "rain", 1)
    with pytest.raises(PotpourriError, match=r"severity 6 is not one of"):
        Corrupted([IMAGE], "fog", 6)
    with pytest.raises(PotpourriError, match=r"uint8 image"):
        corrupt(IMAGE.astype(np.float32), "fog", 1)
