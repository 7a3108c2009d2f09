"""Annotations as language: codecs between geometry (boxes, masks) and the text a language model reads and writes.

Dialects:

* **MiniGPT-v2 boxes** ``{<x1><y1><x2><y2>}`` on a 0-100 grid, coordinates truncated (``int(x / W * 100)``, as
  ``minigpt4/datasets/datasets/coco_dataset.py`` does); several boxes joined by ``<delim>``; a phrase tagged
  ``<p>phrase</p> {<..>}``.
* **All-Seeing v2 region text** ``<ref>phrase</ref><box>[[x1, y1, x2, y2], ...]</box>`` on a 0-999 grid
  (``BOX_SCALE = 999`` in ``all-seeing-v2/scripts_asmv2/visualize_rec.py``).
* **Masks** as polygon text ``<poly><x1><y1><x2><y2>...</poly>`` (contours on the 0-100 grid, several polygons
  joined by ``<delim>``, decoded even-odd so holes survive) and as run-length text
  ``<rle><G><G><start><length>...</rle>`` over a G x G cell grid (runs of ``1`` cells in raster order).

Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates: pixel ``i`` spans ``[i, i + 1)``, so the box of a
mask is ``(min_x, min_y, max_x + 1, max_y + 1)``. The parsers never raise on any string: they skip what they cannot
read, clamp numbers to the grid and order swapped corners.

Example:
    >>> box_to_text((12.0, 40.0, 100.0, 64.0), (128, 128))
    '{<9><31><78><50>}'
    >>> parse_boxes("the crack is at { <9> <31><78 ><50>} and {<1><2><3>}")
    [(9, 31, 78, 50)]
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

__all__ = [
    "ASM_SCALE",
    "GRID",
    "box_to_text",
    "boxes_to_text",
    "dequantize_box",
    "mask_to_box",
    "mask_to_polygon_text",
    "mask_to_rle_text",
    "parse_boxes",
    "parse_phrases",
    "parse_regions",
    "phrase_to_text",
    "polygon_text_to_mask",
    "quantize_box",
    "region_to_text",
    "rle_text_to_mask",
    "text_to_boxes",
]

GRID = 100  # MiniGPT-v2's coordinate grid (image_new_size=[100, 100])
ASM_SCALE = 999  # All-Seeing v2's BOX_SCALE
DELIM = "<delim>"

Box = tuple[float, float, float, float]
GridBox = tuple[int, int, int, int]
Size = tuple[int, int]  # (width, height)

_NUM = r"(-?[0-9]{1,12}(?:\.[0-9]{0,6})?)"  # bounded digit runs: no pathological inputs, no huge floats
# one box: four <n> with any spaces around; the braces are optional so "<1><2><3><4>" still reads
_BOX_RE = re.compile(r"\{?\s*" + r"\s*".join([rf"<\s*{_NUM}\s*>"] * 4) + r"\s*\}?")
_PHRASE_RE = re.compile(r"<p>\s*(.*?)\s*</p>", re.DOTALL)
_REF_RE = re.compile(r"<ref>\s*(.*?)\s*</ref>\s*(?:<box>(.*?)(?:</box>|$))?", re.DOTALL)
_ASM_BOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([_NUM] * 4) + r"\s*\]")
_POLY_RE = re.compile(r"<poly>(.*?)(?:</poly>|$)", re.DOTALL)
_RLE_RE = re.compile(r"<rle>(.*?)(?:</rle>|$)", re.DOTALL)
_ANGLE_NUM_RE = re.compile(rf"<\s*{_NUM}\s*>")


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


def _grid_int(text: str, grid: int) -> int:
    """A parsed number as an int on ``[0, grid]`` (fractions truncated, out-of-range clamped)."""
    return int(_clamp(float(text), 0.0, float(grid)))


def _ordered(a: int, b: int, c: int, d: int) -> GridBox:
    return min(a, c), min(b, d), max(a, c), max(b, d)


# ----------------------------------------------------------------------------------------------- boxes
def quantize_box(box: Sequence[float], size: Size, grid: int = GRID) -> GridBox:
    """Pixel box -> integer grid box by truncation (``int(x / W * grid)``), clamped to ``[0, grid]``."""
    width, height = size
    scales = (width, height, width, height)
    values = [int(_clamp(float(v) / s * grid, 0.0, float(grid))) for v, s in zip(box, scales, strict=True)]
    return _ordered(*values)


def dequantize_box(grid_box: Sequence[int], size: Size, grid: int = GRID) -> Box:
    """Integer grid box -> pixel box (``v / grid * W``); the inverse of ``quantize_box`` up to one grid step."""
    width, height = size
    x1, y1, x2, y2 = (float(v) for v in grid_box)
    return x1 / grid * width, y1 / grid * height, x2 / grid * width, y2 / grid * height


def box_to_text(box: Sequence[float], size: Size) -> str:
    """One pixel box as MiniGPT-v2 text ``{<x1><y1><x2><y2>}`` on the 0-100 grid."""
    x1, y1, x2, y2 = quantize_box(box, size)
    return f"{{<{x1}><{y1}><{x2}><{y2}>}}"


def boxes_to_text(boxes: Sequence[Sequence[float]], size: Size) -> str:
    """Several boxes joined by ``<delim>``."""
    return DELIM.join(box_to_text(b, size) for b in boxes)


def phrase_to_text(phrase: str, boxes: Sequence[Sequence[float]], size: Size) -> str:
    """A grounded phrase: ``<p>phrase</p> {<..>}<delim>{<..>}``."""
    return f"<p>{phrase}</p> {boxes_to_text(boxes, size)}"


def parse_boxes(text: str, grid: int = GRID) -> list[GridBox]:
    """Every complete box in ``text`` as grid ints: spaces tolerated, partial boxes skipped, numbers clamped.

    Never raises: a non-string or unreadable input gives ``[]``.
    """
    if not isinstance(text, str):
        return []
    return [_ordered(*(_grid_int(g, grid) for g in m.groups())) for m in _BOX_RE.finditer(text)]


def text_to_boxes(text: str, size: Size, grid: int = GRID) -> list[Box]:
    """Every complete box in ``text`` in pixels."""
    return [dequantize_box(b, size, grid) for b in parse_boxes(text, grid)]


def parse_phrases(text: str, grid: int = GRID) -> list[tuple[str, list[GridBox]]]:
    """``<p>phrase</p> {box}<delim>{box}`` groups: each phrase with the boxes up to the next phrase."""
    if not isinstance(text, str):
        return []
    matches = list(_PHRASE_RE.finditer(text))
    out = []
    for i, match in enumerate(matches):
        stop = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        out.append((match.group(1), parse_boxes(text[match.end() : stop], grid)))
    return out


def mask_to_box(mask: np.ndarray) -> Box | None:
    """The tight pixel box ``(min_x, min_y, max_x + 1, max_y + 1)`` of a mask's nonzero pixels; None if empty."""
    ys, xs = np.nonzero(np.asarray(mask))
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


# ----------------------------------------------------------------------------------------------- All-Seeing v2
def region_to_text(phrase: str, boxes: Sequence[Sequence[float]], size: Size, scale: int = ASM_SCALE) -> str:
    """All-Seeing v2 region text ``<ref>phrase</ref><box>[[x1, y1, x2, y2], ...]</box>`` on a 0-999 grid."""
    inner = ", ".join(str(list(quantize_box(b, size, scale))) for b in boxes)
    return f"<ref>{phrase}</ref><box>[{inner}]</box>"


def parse_regions(text: str, size: Size, scale: int = ASM_SCALE) -> list[tuple[str, list[Box]]]:
    """``<ref>phrase</ref><box>[[..], ..]</box>`` pairs with pixel boxes; a ref without boxes gets ``[]``."""
    if not isinstance(text, str):
        return []
    out = []
    for match in _REF_RE.finditer(text):
        body = match.group(2) or ""
        grid_boxes = [_ordered(*(_grid_int(g, scale) for g in m.groups())) for m in _ASM_BOX_RE.finditer(body)]
        out.append((match.group(1), [dequantize_box(b, size, scale) for b in grid_boxes]))
    return out


# ----------------------------------------------------------------------------------------------- masks
def mask_to_polygon_text(mask: np.ndarray, grid: int = GRID, tolerance: float = 0.5) -> str:
    """A binary mask as ``<poly><x><y>...</poly>`` polygons on the grid (simplified by ``tolerance`` pixels).

    Every contour (outer boundaries and holes) becomes one polygon; ``polygon_text_to_mask`` fills them even-odd.
    """
    from skimage.measure import approximate_polygon, find_contours

    binary = np.asarray(mask) > 0
    height, width = binary.shape
    padded = np.pad(binary.astype(np.float32), 1)  # closes contours that touch the border
    polygons = []
    for contour in find_contours(padded, 0.5):
        contour = approximate_polygon(contour, tolerance=tolerance) if tolerance > 0 else contour
        # contour rows/cols are pixel centres in the padded frame; pixel centres sit at i + 0.5 in box coordinates
        xs, ys = contour[:, 1] - 1 + 0.5, contour[:, 0] - 1 + 0.5
        gx = np.clip(np.round(xs / width * grid), 0, grid).astype(int)
        gy = np.clip(np.round(ys / height * grid), 0, grid).astype(int)
        points = [
            (x, y) for i, (x, y) in enumerate(zip(gx, gy, strict=True)) if i == 0 or (x, y) != (gx[i - 1], gy[i - 1])
        ]
        if len(points) > 1 and points[0] == points[-1]:
            points = points[:-1]
        if len(points) >= 3:
            polygons.append("<poly>" + "".join(f"<{x}><{y}>" for x, y in points) + "</poly>")
    return DELIM.join(polygons)


def _fill_polygon(points: list[tuple[float, float]], size: Size) -> np.ndarray:
    """Pixels whose centre lies inside the polygon (box coordinates: pixel centres at ``i + 0.5``)."""
    from skimage.draw import polygon

    width, height = size
    xy = np.asarray(points, dtype=np.float64)
    out = np.zeros((height, width), dtype=bool)
    rows, cols = polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=(height, width))
    out[rows, cols] = True
    return out


def polygon_text_to_mask(text: str, size: Size, grid: int = GRID) -> np.ndarray:
    """Polygon text -> ``(H, W)`` bool mask, even-odd over all polygons; polygons with < 3 points are skipped."""
    width, height = size
    out = np.zeros((height, width), dtype=bool)
    if not isinstance(text, str):
        return out
    for match in _POLY_RE.finditer(text):
        numbers = [_clamp(float(n), 0.0, float(grid)) for n in _ANGLE_NUM_RE.findall(match.group(1))]
        points = [(numbers[i] / grid * width, numbers[i + 1] / grid * height) for i in range(0, len(numbers) - 1, 2)]
        if len(points) >= 3:
            out ^= _fill_polygon(points, size)
    return out


def _cell_index(length: int, cells: int) -> np.ndarray:
    """The grid cell of each pixel along one axis: ``floor(i * cells / length)``."""
    return (np.arange(length) * cells) // length


def mask_to_rle_text(mask: np.ndarray, grid: int = 32) -> str:
    """A mask as run-length text over a ``grid x grid`` cell raster: a cell is on when half its pixels are.

    Format: ``<rle><grid><grid><start><length>...</rle>``, runs of on-cells in raster order.
    """
    binary = np.asarray(mask) > 0
    height, width = binary.shape
    rows, cols = _cell_index(height, grid), _cell_index(width, grid)
    flat_cells = (rows[:, None] * grid + cols[None, :]).ravel()
    on = np.bincount(flat_cells, weights=binary.ravel().astype(np.float64), minlength=grid * grid)
    total = np.bincount(flat_cells, minlength=grid * grid)
    cells = (on * 2 >= np.maximum(total, 1)) & (total > 0) & (on > 0)
    padded = np.concatenate([[False], cells, [False]]).astype(np.int8)
    changes = np.flatnonzero(np.diff(padded))
    starts, stops = changes[::2], changes[1::2]
    runs = "".join(f"<{s}><{e - s}>" for s, e in zip(starts, stops, strict=True))
    return f"<rle><{grid}><{grid}>{runs}</rle>"


def rle_text_to_mask(text: str, size: Size) -> np.ndarray:
    """Run-length text -> ``(H, W)`` bool mask; runs outside the grid are clipped, unreadable text gives zeros."""
    width, height = size
    out = np.zeros((height, width), dtype=bool)
    match = _RLE_RE.search(text) if isinstance(text, str) else None
    if match is None:
        return out
    numbers = [int(_clamp(float(n), 0.0, 1e6)) for n in _ANGLE_NUM_RE.findall(match.group(1))]
    if len(numbers) < 2 or min(numbers[:2]) < 1 or max(numbers[:2]) > 1024:
        return out
    grid_h, grid_w = numbers[:2]
    cells = np.zeros(grid_h * grid_w, dtype=bool)
    for i in range(2, len(numbers) - 1, 2):
        start, length = numbers[i], numbers[i + 1]
        cells[min(start, cells.size) : min(start + length, cells.size)] = True
    cells = cells.reshape(grid_h, grid_w)
    return cells[_cell_index(height, grid_h)[:, None], _cell_index(width, grid_w)[None, :]]
