"""Geometry <-> text codecs: round trips within one grid step, a parser that never raises, IoU as torchvision."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import draw
from torchvision.ops import box_iou as tv_box_iou

from potpourri.core import textgeo as tg
from potpourri.core.boxes import box_iou

# MiniGPT-v2's REC answer check (eval_scripts/eval_ref.py)
MINIGPT_RE = re.compile(r"\{<\d{1,3}><\d{1,3}><\d{1,3}><\d{1,3}>\}")


def _random_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    xs = np.sort(rng.uniform(0, width, size=(n, 2)), axis=1)
    ys = np.sort(rng.uniform(0, height, size=(n, 2)), axis=1)
    return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)


def test_box_text_matches_minigpt_truncation_and_round_trips_within_one_grid_step() -> None:
    rng = np.random.default_rng(0)
    for width, height in [(64, 64), (448, 448), (640, 427), (97, 31)]:
        boxes = _random_boxes(rng, 200, width, height)
        boxes[0] = (0, 0, width, height)  # the image edges map to 0 and 100
        for box in boxes:
            text = tg.box_to_text(box, (width, height))
            assert MINIGPT_RE.fullmatch(text)
            expected = [int(v / s * 100) for v, s in zip(box, (width, height, width, height), strict=True)]
            assert tg.parse_boxes(text) == [tuple(expected)]
            (decoded,) = tg.text_to_boxes(text, (width, height))
            step = np.array([width, height, width, height]) / 100
            error = np.asarray(box) - np.asarray(decoded)
            assert np.all(error >= -1e-9) and np.all(error < step + 1e-9)  # truncation: never above, < one step


def test_parser_tolerates_spaces_partial_boxes_out_of_range_and_swapped_corners() -> None:
    assert tg.parse_boxes("{ <1> <2>  <30 ><40>}") == [(1, 2, 30, 40)]
    assert tg.parse_boxes("<1><2><30><40>") == [(1, 2, 30, 40)]  # braces missing
    assert tg.parse_boxes("{<1><2><30>} {<5><6><7><8>}") == [(5, 6, 7, 8)]  # a partial box is skipped
    assert tg.parse_boxes("{<150><-5><20><300>}") == [(20, 0, 100, 100)]  # clamped, then ordered
    assert tg.parse_boxes("{<60><70><10><20>}") == [(10, 20, 60, 70)]  # swapped corners
    assert tg.parse_boxes("{<12.7><3.2><50><50.9>}") == [(12, 3, 50, 50)]  # fractions truncated
    assert tg.parse_boxes("{<1><2><3><4>}<delim>{<5><6><7><8>}") == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert tg.parse_boxes("{<1><2><3><99999999999999999999999>}") == []  # a 23-digit number is no coordinate
    assert tg.parse_boxes("the scratch is in the upper left") == []
    assert tg.parse_phrases("<p>a crack</p> {<1><2><3><4>}<delim>{<5><6><7><8>} <p>a hole</p>{<9><9><10><10>}") == [
        ("a crack", [(1, 2, 3, 4), (5, 6, 7, 8)]),
        ("a hole", [(9, 9, 10, 10)]),
    ]


def _random_text(rng: np.random.Generator) -> str:
    pieces = ["{", "}", "<", ">", "<p>", "</p>", "<delim>", "<ref>", "</ref>", "<box>", "</box>", "[", "]", ",",
              "<poly>", "</poly>", "<rle>", "</rle>", "-", ".", " ", "\n", "é", "١", "\x00", "a", "xyz"]  # fmt: skip
    parts = []
    for _ in range(int(rng.integers(0, 40))):
        if rng.random() < 0.4:
            parts.append(
                str(int(rng.integers(-(10**15), 10**15)) if rng.random() < 0.1 else int(rng.integers(-20, 1200)))
            )
        elif rng.random() < 0.1:
            parts.append(chr(int(rng.integers(1, 0x2FFFF))))
        else:
            parts.append(pieces[int(rng.integers(len(pieces)))])
    return "".join(parts)


def test_every_parser_survives_random_strings_and_returns_well_formed_output() -> None:
    rng = np.random.default_rng(1)
    samples = [_random_text(rng) for _ in range(3000)] + [None, 5, b"{<1><2><3><4>}", ""]  # type: ignore[list-item]
    for text in samples:
        for x1, y1, x2, y2 in tg.parse_boxes(text):
            assert 0 <= x1 <= x2 <= 100 and 0 <= y1 <= y2 <= 100
        for phrase, boxes in tg.parse_phrases(text):
            assert isinstance(phrase, str) and all(len(b) == 4 for b in boxes)
        for _, boxes in tg.parse_regions(text, (50, 40)):
            assert all(0 <= b[0] <= b[2] <= 50 and 0 <= b[1] <= b[3] <= 40 for b in boxes)
        assert tg.polygon_text_to_mask(text, (20, 10)).shape == (10, 20)
        assert tg.rle_text_to_mask(text, (20, 10)).shape == (10, 20)


def test_all_seeing_region_text_round_trips_within_one_step_of_the_999_grid() -> None:
    rng = np.random.default_rng(2)
    size = (640, 480)
    boxes = _random_boxes(rng, 3, *size)
    text = tg.region_to_text("a long dark scratch", boxes, size)
    assert text.startswith("<ref>a long dark scratch</ref><box>[[") and text.endswith("]]</box>")
    ((phrase, decoded),) = tg.parse_regions(text, size)
    assert phrase == "a long dark scratch" and len(decoded) == 3
    step = np.array([640, 480, 640, 480]) / 999
    error = boxes - np.asarray(decoded)
    assert np.all(error >= -1e-9) and np.all(error < step + 1e-9)
    assert tg.parse_regions("<ref>a hole</ref>", size) == [("a hole", [])]  # an unfinished region is kept, boxless


def test_phrase_text_round_trip() -> None:
    text = tg.phrase_to_text("a crack", [(0, 0, 32, 32), (32, 16, 64, 48)], (64, 64))
    assert text == "<p>a crack</p> {<0><0><50><50>}<delim>{<50><25><100><75>}"
    assert tg.parse_phrases(text) == [("a crack", [(0, 0, 50, 50), (50, 25, 100, 75)])]


def test_box_iou_matches_torchvision_and_the_plus_one_convention() -> None:
    rng = np.random.default_rng(3)
    a, b = _random_boxes(rng, 30, 100, 80), _random_boxes(rng, 20, 100, 80)
    b[:3] = a[:3]  # identical boxes: IoU 1
    expected = tv_box_iou(torch.as_tensor(a), torch.as_tensor(b)).numpy()
    np.testing.assert_allclose(box_iou(a, b), expected, atol=1e-12)
    np.testing.assert_allclose(np.diag(box_iou(a[:3], b[:3])), 1.0)
    shifted = lambda x: torch.as_tensor(x + np.array([0, 0, 1, 1]))  # noqa: E731  (+1 px = a box one pixel wider)
    np.testing.assert_allclose(box_iou(a, b, plus_one=True), tv_box_iou(shifted(a), shifted(b)).numpy(), atol=1e-12)
    assert box_iou([[0, 0, 0, 0]], [[0, 0, 0, 0]])[0, 0] == 0.0  # empty boxes: 0, not NaN


def test_mask_to_box_is_the_tight_pixel_box() -> None:
    mask = np.zeros((40, 50), np.uint8)
    mask[7:19, 11:30] = 3
    assert tg.mask_to_box(mask) == (11.0, 7.0, 30.0, 19.0)
    assert tg.mask_to_box(np.zeros((4, 4))) is None


def _shapes(rng: np.random.Generator, size: int) -> list[np.ndarray]:
    masks = []
    for _ in range(12):
        mask = np.zeros((size, size), bool)
        for _ in range(int(rng.integers(1, 3))):
            r, c = rng.integers(8, size - 8, 2)
            if rng.random() < 0.5:
                rr, cc = draw.ellipse(r, c, rng.integers(3, 14), rng.integers(3, 14), shape=mask.shape)
            else:
                rr, cc = draw.rectangle(
                    (r - rng.integers(2, 8), c - rng.integers(2, 8)), (r + 5, c + 9), shape=mask.shape
                )
            mask[rr, cc] = True
        if rng.random() < 0.3:
            mask[size // 2 - 3 : size // 2 + 3, size // 2 - 3 : size // 2 + 3] ^= True  # sometimes a hole
        masks.append(mask)
    return masks


def _wrong_pixels_distance(mask: np.ndarray, decoded: np.ndarray) -> float:
    """How far (px) the worst wrong pixel lies from the true mask's boundary."""
    inside, outside = ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask)
    wrong = np.where(mask, inside, outside)[mask != decoded]
    return float(wrong.max()) if wrong.size else 0.0


@pytest.mark.parametrize("size", [64, 200])
def test_polygon_text_errors_stay_within_a_grid_step_of_the_boundary(size: int) -> None:
    step = size / tg.GRID
    for mask in _shapes(np.random.default_rng(size), size):
        text = tg.mask_to_polygon_text(mask, tolerance=0.5)
        assert text.count("<poly>") >= 1
        decoded = tg.polygon_text_to_mask(text, (size, size))
        assert _wrong_pixels_distance(mask, decoded) <= step + 0.5 + 1.0  # grid step + simplification + 1 px
        inter, union = (mask & decoded).sum(), (mask | decoded).sum()
        assert inter / union > 0.8


def test_rle_text_is_exact_on_grid_aligned_masks_and_boundary_limited_otherwise() -> None:
    rng = np.random.default_rng(5)
    for _ in range(10):
        cells = rng.random((16, 16)) < 0.3
        mask = np.kron(cells, np.ones((4, 4), bool))  # 64x64, every 4x4 block one cell
        assert np.array_equal(tg.rle_text_to_mask(tg.mask_to_rle_text(mask, 16), (64, 64)), mask)
    for mask in _shapes(rng, 96):
        decoded = tg.rle_text_to_mask(tg.mask_to_rle_text(mask, 32), (96, 96))
        assert _wrong_pixels_distance(mask, decoded) <= 3 * np.sqrt(2) + 1e-9  # within one 3x3-px cell
    assert tg.mask_to_rle_text(np.zeros((10, 10)), 8) == "<rle><8><8></rle>"
    assert not tg.rle_text_to_mask("<rle><8><8></rle>", (10, 10)).any()
