"""Tiny planted inspection data: crops of real textures (scikit-image) with a pasted square and its exact mask.

Train crops come from rows 0-319 of the 512² photo, test crops from rows 320-511, so no test pixel is in the bank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

SIZE = 96  # crop and model input size: small so the suite stays fast on 2 shared cores
SQUARE = 16


def texture_crops(name: str, rows: tuple[int, int], n: int, *, seed: int, size: int = SIZE) -> list[np.ndarray]:
    """``n`` RGB uint8 crops of a scikit-image texture taken from the given row band."""
    gray = getattr(data, name)()
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        top = int(rng.integers(rows[0], rows[1] - size + 1))
        left = int(rng.integers(0, gray.shape[1] - size + 1))
        crops.append(np.repeat(gray[top : top + size, left : left + size, None], 3, axis=2).copy())
    return crops


def plant_square(image: np.ndarray, *, seed: int, bright: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Paste a uniform bright (or dark) square at a seeded spot; return the image and its exact 0/1 mask."""
    rng = np.random.default_rng(seed)
    size = image.shape[0]
    top, left = (int(v) for v in rng.integers(8, size - SQUARE - 8, 2))
    out, mask = image.copy(), np.zeros(image.shape[:2], dtype=np.uint8)
    out[top : top + SQUARE, left : left + SQUARE] = (250, 250, 40) if bright else (10, 10, 60)
    mask[top : top + SQUARE, left : left + SQUARE] = 1
    return out, mask


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One thread: on 2 shared, busy cores a second OpenMP thread made these tests several times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Planted:
    """Normal train images, test images with labels and masks, all as arrays."""

    train: list[np.ndarray]
    test: list[np.ndarray]
    labels: np.ndarray
    masks: np.ndarray  # (N, SIZE, SIZE) 0/1


def make_planted(texture: str = "brick", *, n_train: int = 8, n_good: int = 3, n_bad: int = 3, seed: int = 0):
    train = texture_crops(texture, (0, 320), n_train, seed=seed)
    good = texture_crops(texture, (320, 512), n_good + n_bad, seed=seed + 1)
    test, masks = list(good[:n_good]), [np.zeros((SIZE, SIZE), np.uint8)] * n_good
    for i, image in enumerate(good[n_good:]):
        planted, mask = plant_square(image, seed=seed + 10 + i, bright=i % 2 == 0)
        test.append(planted)
        masks.append(mask)
    return Planted(train, test, np.array([0] * n_good + [1] * n_bad), np.stack(masks))


@pytest.fixture(scope="session")
def planted() -> Planted:
    return make_planted()


@pytest.fixture(scope="session")
def mvtec_folder(tmp_path_factory: pytest.TempPathFactory, planted: Planted) -> Path:
    """The planted data in MVTec-AD layout: train/good, test/{good,square}, ground_truth/square/NNN_mask.png."""
    root = tmp_path_factory.mktemp("planted_mvtec")
    for sub in ("train/good", "test/good", "test/square", "ground_truth/square"):
        (root / sub).mkdir(parents=True)
    for i, image in enumerate(planted.train):
        Image.fromarray(image).save(root / "train/good" / f"{i:03d}.png")
    bad = 0
    for image, label, mask in zip(planted.test, planted.labels, planted.masks, strict=True):
        if label:
            Image.fromarray(image).save(root / "test/square" / f"{bad:03d}.png")
            Image.fromarray(mask * 255).save(root / "ground_truth/square" / f"{bad:03d}_mask.png")
            bad += 1
        else:
            Image.fromarray(image).save(root / "test/good" / f"{len(list((root / 'test/good').iterdir())):03d}.png")
    return root


@pytest.fixture(scope="session")
def small_config():
    from potpourri.inspect.patchcore import PatchCoreConfig

    return PatchCoreConfig(image_size=SIZE, coreset_ratio=0.25, batch_size=8, sigma=2.0, seed=0)


@pytest.fixture(scope="session")
def lite0():
    """The offline ImageNet EfficientNet-Lite0, loaded once and shared by every PatchCore in the tests."""
    from potpourri import create_model

    return create_model("efficientnet_lite0", pretrained=True).eval()


@pytest.fixture(scope="session")
def fitted(planted: Planted, small_config, lite0):
    from potpourri.inspect.patchcore import PatchCore

    return PatchCore(small_config, backbone=lite0).fit(planted.train)
