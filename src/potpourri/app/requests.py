"""Requests in plain language, run on a segmenter: route the request to a call (``vlm/router.py``), run the call on
the segmenter's class maps of the session's images, answer in words (and a mask where the call draws one).

Calls and what they answer (``kind`` "any" means every defect class):

* ``find(kind)``: the images holding at least ``MIN_PIXELS`` predicted pixels of the kind;
* ``worst(k, kind)``: the k images with the largest share of such pixels;
* ``count(kind)``: the connected regions of the kind in the current image;
* ``segment(kind)``: the current image's mask of the kind;
* ``describe(kind)``: one sentence for the largest region of the kind (``data/describe.py``);
* ``refuse()``: a clear refusal listing what can be asked.

An anomaly-detection run (PatchCore) answers too, through ``AnomalyClasses``: its calibrated pixel mask is the class
map ("anomaly" vs "good"). It cannot tell kinds apart, so a call about one kind gets a clear answer saying so
instead of an answer about every anomaly.

Example:
    runner = RequestRunner.from_run("runs/segmenter/v0", router="keywords")
    runner.answer("how many holes are in this part?", {"part.png": pixels}, "part.png").text
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
from scipy import ndimage

from potpourri.core.errors import PotpourriError
from potpourri.data.describe import describe_mask
from potpourri.vlm.router import KINDS, Call, KeywordRouter

__all__ = ["KINDLESS", "MIN_PIXELS", "ROUTERS", "AnomalyClasses", "CallResult", "RequestRunner", "load_router",
           "run_call"]  # fmt: skip

MIN_PIXELS = 16  # fewer predicted pixels of a kind than this is no finding
ROUTERS = ("keywords", "smollm2")
REFUSAL = (
    "Sorry, I can't do that. I can find, rank (worst k), count, segment or describe defects of these kinds: "
    + ", ".join(KINDS[:-1])
    + ' (or any), e.g. "how many holes are in this part?".'
)
KINDLESS = (
    "This run detects anomalies but cannot tell defect kinds apart, so it cannot answer about {kind} defects. Ask "
    'about any defect ("how many defects are in this part?") or use a segmenter run (`inspect segment-train`).'
)


@dataclass
class CallResult:
    """What a request got: the call it was routed to, the answer in words and, for segment, the mask."""

    call: Call
    text: str
    mask: np.ndarray | None = None  # (H, W) bool, of the current image


def _kind_mask(class_map: np.ndarray, kind: str, class_names: tuple[str, ...]) -> np.ndarray:
    if kind == "any":
        return class_map > 0
    if kind not in class_names:
        return np.zeros(class_map.shape, bool)
    return class_map == class_names.index(kind)


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    parts = [labels == i for i in range(1, count + 1)]
    return sorted((p for p in parts if p.sum() >= MIN_PIXELS), key=lambda p: -int(p.sum()))


def run_call(call: Call, class_maps: dict[str, np.ndarray], class_names: tuple[str, ...], current: str) -> CallResult:
    """Run ``call`` on the (H, W) class-id maps of the session's images (name -> map); ``current`` names the image
    that count / segment / describe speak about."""
    if call.verb == "refuse":
        return CallResult(call, REFUSAL)
    kind = call.kind or "any"
    what = "defect" if kind == "any" else kind
    if call.verb in ("find", "worst"):
        shares = {name: float(_kind_mask(m, kind, class_names).mean()) for name, m in class_maps.items()}
        found = {n: s for n, s in shares.items() if s * class_maps[n].size >= MIN_PIXELS}
        if call.verb == "find":
            listed = ", ".join(found) or "none"
            return CallResult(call, f"{what} found in {len(found)} of {len(class_maps)} image(s): {listed}")
        ranked = sorted(found, key=lambda n: -found[n])[: call.k]
        parts = ", ".join(f"{n} ({found[n]:.1%} of its pixels)" for n in ranked)
        head = f"worst {call.k} by {what}" + (f" (only {len(ranked)} have any)" if len(ranked) < (call.k or 0) else "")
        return CallResult(call, f"{head}: {parts or 'no image has any'}")
    mask = _kind_mask(class_maps[current], kind, class_names)
    regions = _regions(mask)
    if call.verb == "count":
        return CallResult(call, f"{len(regions)} {what} region(s) in {current}")
    if call.verb == "segment":
        return CallResult(call, f"{what}: {int(mask.sum())} px ({mask.mean():.1%}) in {current}", mask)
    if not regions:
        return CallResult(call, f"no {what} found in {current}")
    largest = regions[0]
    if kind == "any":  # name the largest region by its majority class
        ids = class_maps[current][largest]
        what = class_names[int(np.bincount(ids, minlength=len(class_names)).argmax())]
    return CallResult(call, describe_mask(largest, what), largest)


def load_router(name: str, *, lm: str = "smollm2_135m") -> Callable[[str], Call]:
    """``keywords`` (the baseline) or ``smollm2`` (grammar-constrained SmolLM2-135M-Instruct, loaded offline)."""
    if name == "keywords":
        return KeywordRouter().route
    if name == "smollm2":
        from potpourri.core.registry import create_model
        from potpourri.vlm.router import LMRouter

        return LMRouter(create_model(lm, pretrained=True)).route
    raise PotpourriError(f"unknown router '{name}'; choose from {', '.join(ROUTERS)}")


class AnomalyClasses:
    """An anomaly-detection method (PatchCore, an ``inspect fit`` run) seen as a two-class segmenter: its calibrated
    pixel mask at the image's own size is class 1, "anomaly"; ``tells_kinds`` is False."""

    tells_kinds = False

    def __init__(self, method: Any) -> None:
        if method.thresholds.pixel is None:
            raise PotpourriError(
                f"'{method.name}' run has no pixel threshold, so it draws no mask to answer "
                "requests from; calibrate it with masks (`inspect fit` on a test split with masks)"
            )
        self.method = method
        self.config = SimpleNamespace(class_names=("good", "anomaly"))

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W) class ids: 1 where the method's pixel mask, resized to each image (nearest), is set."""
        from PIL import Image

        maps = []
        for image, result in zip(images, self.method.predict(list(images)), strict=True):
            mask = Image.fromarray(result.mask.astype(np.uint8))
            maps.append(np.asarray(mask.resize(image.shape[1::-1], Image.Resampling.NEAREST)).astype(np.int64))
        return np.stack(maps)


class RequestRunner:
    """A router and a segmenter: ``answer(request, images, current)`` routes, runs and answers. The segmenter is
    anything with ``config.class_names`` and ``predict((N, H, W, 3) uint8) -> (N, H, W) class ids`` (class 0 is the
    background), e.g. a trained ``Segmenter`` or ``AnomalyClasses(patchcore)``."""

    def __init__(self, router: Callable[[str], Call], segmenter: Any) -> None:
        self.router, self.segmenter = router, segmenter
        self.class_names = tuple(segmenter.config.class_names)
        self.tells_kinds = getattr(segmenter, "tells_kinds", True)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, *, router: str = "keywords") -> RequestRunner:
        """A runner over a saved run: a segmenter (``inspect segment-train``) or an anomaly detector (``inspect
        fit``, through ``AnomalyClasses``)."""
        from potpourri.deploy.runs import run_kind

        if run_kind(run_dir) == "inspection":
            from potpourri.inspect.base import load_method

            return cls(load_router(router), AnomalyClasses(load_method(run_dir)))
        from potpourri.segment.segmenter import Segmenter

        return cls(load_router(router), Segmenter.load(run_dir))

    def class_map(self, image: np.ndarray) -> np.ndarray:
        """The segmenter's class map of ``image``, predicted once per array (the cache keeps the array itself, so a
        new array that reuses a freed one's id is predicted afresh)."""
        cached = self._maps.get(id(image))
        if cached is None or cached[0] is not image:
            cached = self._maps[id(image)] = (image, self.segmenter.predict(image[None])[0])
        return cached[1]

    def run(self, call: Call, images: dict[str, np.ndarray], current: str) -> CallResult:
        """Run an already-routed call (``/describe`` comes here directly); a call about one kind on a run that cannot
        tell kinds apart is answered with ``KINDLESS``."""
        if not self.tells_kinds and call.verb != "refuse" and call.kind not in (None, "any"):
            return CallResult(call, KINDLESS.format(kind=call.kind))
        return run_call(call, {name: self.class_map(img) for name, img in images.items()}, self.class_names, current)

    def answer(self, request: str, images: dict[str, np.ndarray], current: str) -> CallResult:
        """Route ``request`` and run its call on ``images`` (name -> (H, W, 3) uint8)."""
        if not (request or "").strip():
            raise PotpourriError('empty request; ask e.g. "how many holes are in this part?"')
        return self.run(self.router(request), images, current)
