"""Annotations in words (``data/describe.py``) against planted regions whose position, shape and orientation are
known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from potpourri.core.textgeo import mask_to_box
from potpourri.data.describe import (
    CELLS,
    EXTENTS,
    ORIENTATIONS,
    SHAPES,
    SIZES,
    describe_mask,
    parse_description,
    region_words,
)

SIDE = 120  # 3x3 cells of 40 px


def _cell_centre(cell: str) -> tuple[float, float]:
    k = CELLS.index(cell)
    return (k % 3 + 0.5) * SIDE / 3, (k // 3 + 0.5) * SIDE / 3


def _line(cx: float, cy: float, angle_deg: float, length: float, width: int = 3) -> np.ndarray:
    canvas = Image.new("L", (SIDE, SIDE), 0)
    d = np.array([np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))]) * length / 2
    ImageDraw.Draw(canvas).line([(cx - d[0], cy - d[1]), (cx + d[0], cy + d[1])], fill=255, width=width)
    return np.asarray(canvas) > 0


def _disc(cx: float, cy: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius**2


def _box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# angle in image coordinates (y down): 45 degrees runs from upper left to lower right
@pytest.mark.parametrize(
    ("cell", "angle", "orientation"),
    [("upper left", 0, "horizontal"), ("lower right", 90, "vertical"), ("centre", 45, "diagonal"),
     ("upper right", 135, "anti-diagonal"), ("middle left", 10, "horizontal"), ("lower middle", 100, "vertical")],
)  # fmt: skip
def test_a_thin_line_gets_its_cell_orientation_and_shape(cell: str, angle: float, orientation: str) -> None:
    mask = _line(*_cell_centre(cell), angle, length=36, width=2)
    words = region_words(mask, "scratch")
    assert (words.cell, words.orientation, words.shape) == (cell, orientation, "thin")
    sentence = describe_mask(mask, "scratch")
    assert f"thin {orientation} scratch in the {cell} of the image" in sentence


def test_shapes_of_planted_regions() -> None:
    cx, cy = _cell_centre("centre")
    disc = _disc(cx, cy, 12)
    assert region_words(disc).shape == "round" and region_words(disc).orientation is None
    ellipse = ((np.mgrid[0:SIDE, 0:SIDE][1] + 0.5 - cx) / 18) ** 2 + ((np.mgrid[0:SIDE, 0:SIDE][0] + 0.5 - cy) / 7) ** 2
    assert (region_words(ellipse <= 1).shape, region_words(ellipse <= 1).orientation) == ("elongated", "horizontal")
    plus = np.zeros((SIDE, SIDE), bool)
    plus[int(cy) - 15 : int(cy) + 15, int(cx) - 2 : int(cx) + 2] = True
    plus[int(cy) - 2 : int(cy) + 2, int(cx) - 15 : int(cx) + 15] = True
    assert region_words(plus).shape == "irregular"  # as wide as tall, but it fills little of its moment ellipse
    specks = np.zeros((SIDE, SIDE), bool)
    for dx, dy in [(-8, -6), (5, -9), (9, 4), (-4, 8), (0, 0)]:
        specks |= _disc(cx + dx, cy + dy, 1.6)
    assert region_words(specks).shape == "cluster"


@pytest.mark.parametrize(("pixels", "word"), [(20, "tiny"), (100, "small"), (400, "medium"), (1000, "large")])
def test_size_words_follow_the_area_fraction(pixels: int, word: str) -> None:
    mask = np.zeros((SIDE, SIDE), bool)
    mask.ravel()[np.linspace(0, SIDE * SIDE - 1, pixels).astype(int)] = True  # area is all that size reads
    assert region_words(mask).size == word
    limits = dict(SIZES)
    below = [w for w, _ in SIZES][max(0, [w for w, _ in SIZES].index(word) - 1)]
    assert pixels / SIDE**2 < limits[word] and (word == "tiny" or pixels / SIDE**2 >= limits[below])


@pytest.mark.parametrize("cell", CELLS)
def test_parse_of_describe_recovers_the_box_of_cell_centred_regions(cell: str) -> None:
    cx, cy = _cell_centre(cell)
    for mask in (_disc(cx, cy, 12), _line(cx, cy, 0, 40, 3), _line(cx, cy, 45, 34, 3), _line(cx, cy, 90, 30, 5)):
        prior = parse_description(describe_mask(mask, "hole"), SIDE)
        assert prior.kind == "hole" and prior.words["cell"] == cell
        assert _box_iou(prior.box, mask_to_box(mask)) >= 0.5  # stated threshold: the words' box of a centred region


def test_every_vocabulary_word_round_trips_through_a_sentence() -> None:
    kinds = ["scratch", "crack", "stain", "hole", "contamination", "dent"]
    fields = {"shape": SHAPES, "orientation": ORIENTATIONS, "cell": CELLS, "size": [w for w, _ in SIZES],
              "extent": [w for w, _ in EXTENTS], "kind": kinds}  # fmt: skip
    base = {"size": "small", "shape": "thin", "orientation": "vertical", "kind": "dent", "cell": "centre",
            "extent": "half"}  # fmt: skip
    for name, words in fields.items():
        for word in words:
            w = base | {name: word}
            sentence = f"a {w['size']} {w['shape']} {w['orientation']} {w['kind']} in the {w['cell']} of the image, " \
                       f"about {w['extent']} of the image across"  # fmt: skip
            assert parse_description(sentence, SIDE).words[name] == word, sentence


def test_parse_never_raises_and_falls_back_to_the_centre() -> None:
    for text in ("", "nothing useful here", None, "<poly><1><2>"):
        prior = parse_description(text, (90, 60))
        assert prior.centre == (45.0, 30.0) and prior.kind is None
    soft = parse_description("a thin vertical scratch in the upper right", 90).soft_map()
    y, x = np.unravel_index(int(soft.argmax()), soft.shape)
    assert 60 <= x < 90 and 0 <= y < 30 and soft.shape == (90, 90)
    assert soft[:, int(x)].sum() > soft[int(y), :].sum()  # vertical: the prior runs down the column


def test_an_empty_mask_is_a_one_line_error() -> None:
    from potpourri.core.errors import PotpourriError

    with pytest.raises(PotpourriError, match="non-empty"):
        describe_mask(np.zeros((8, 8), bool), "stain")
