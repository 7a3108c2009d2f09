"""The held-out photo sets (issue 21): seeded bytes, masks that cover exactly the painted pixels, the MVTec layout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from potpourri.core.errors import PotpourriError
from potpourri.data.folders import read_folder
from potpourri.data.photo_sets import PHOTO_SETS, make_image, make_pair, write_photo_set

CASES = [(name, kind) for name, (kinds, *_) in PHOTO_SETS.items() for kind in kinds]


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_defect_changes_only_masked_pixels_and_most_of_them(name: str, kind: str) -> None:
    clean, image, mask = make_pair(name, "test", 3, seed=0, size=96, defect=kind)
    changed = np.abs(image.astype(int) - clean.astype(int)).max(-1) > 0
    assert mask.any() and not (changed & ~mask).any()  # outside the mask: the clean bytes
    assert changed[mask].mean() > 0.6  # inside: painted (resizing the coin tray blurs a rim of the mask)
    assert mask.mean() < 0.1  # a small local defect


@pytest.mark.parametrize("name", list(PHOTO_SETS))
def test_same_seed_same_bytes_other_seed_other_bytes(name: str) -> None:
    first, _ = make_image(name, "train", 0, seed=0, size=64)
    again, _ = make_image(name, "train", 0, seed=0, size=64)
    other, _ = make_image(name, "train", 0, seed=1, size=64)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    good, mask = make_image(name, "test", 0, seed=0, size=64)
    assert good.shape == (64, 64, 3) and good.dtype == np.uint8 and not mask.any()


def test_written_set_reads_back_as_mvtec_with_its_masks(tmp_path) -> None:
    folder = write_photo_set(tmp_path, "coins", seed=2, size=64)
    data = read_folder(str(folder))
    kinds, n_train, n_good, per_kind = PHOTO_SETS["coins"]
    assert data.layout == "mvtec" and len(data.train) == n_train
    assert sum(data.labels) == per_kind * len(kinds) and len(data.test) == n_good + per_kind * len(kinds)
    assert sorted(data.defect_types) == sorted(kinds)
    path, mask_path = next((p, m) for p, m in zip(data.test, data.mask_paths, strict=True) if m is not None)
    kind, index = path.parent.name, int(path.stem)
    image, mask = make_image("coins", "test", index, seed=2, size=64, defect=kind)
    assert np.array_equal(np.asarray(Image.open(path)), image)
    assert np.array_equal(np.asarray(Image.open(mask_path)) > 0, mask)


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(PotpourriError, match="choose from retina"):
        make_image("wood", "train", 0)
    with pytest.raises(PotpourriError, match="has no defect 'swap'"):
        make_image("coins", "test", 0, defect="swap")
