"""Annotation with a promptable model: points and boxes on one image -> a class-index mask file (our small SAM or
an official SAM checkpoint)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from potpourri.core.errors import PotpourriError


def _check_inside(xy: np.ndarray, width: int, height: int, what: str) -> None:
    if xy.size and ((xy[..., 0] < 0).any() or (xy[..., 0] >= width).any() or (xy[..., 1] < 0).any()
                    or (xy[..., 1] >= height).any()):  # fmt: skip
        raise PotpourriError(f"{what} {xy.tolist()} lies outside the {width}x{height} image")


def annotate(
    image: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    box: np.ndarray | None,
    *,
    model: str | None = None,
    sam_weights: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
) -> np.ndarray:
    """(H, W) bool mask for the prompts (pixel x, y of ``image``) from a ``sam-train`` run or official weights,
    computed on ``device`` (auto, cpu, cuda, cuda:N) in ``precision`` (fp32, bf16, fp16)."""
    height, width = image.shape[:2]
    _check_inside(points.reshape(-1, 2), width, height, "point")
    if box is not None:
        _check_inside(box.reshape(2, 2), width, height, "box corner")
    if not len(points) and box is None:
        raise PotpourriError("give at least one --points x,y or a --box x0,y0,x1,y1")
    if (model is None) == (sam_weights is None):
        raise PotpourriError("pass exactly one of --model RUN (a `potpourri sam-train` run) or --sam-weights PATH")
    import torch

    from potpourri.core.training import autocast, check_precision, resolve_device

    where = resolve_device(device)
    check_precision(precision, where)
    if sam_weights is not None:
        return _annotate_official(image, points, labels, box, sam_weights, where, precision)

    from potpourri.models.sam import Sam
    from potpourri.segment.sam import predict_mask

    sam = Sam.load(model).to(where)
    size = sam.config.image_size
    scale = np.array([size / width, size / height], np.float32)
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    prompt: dict[str, np.ndarray] = {}
    if len(points):
        prompt = {"points": (points * scale).astype(np.float32), "labels": labels.astype(np.int64)}
    if box is not None:
        if len(points):
            raise PotpourriError("a sam-train model takes points or a box, not both; drop one")
        prompt = {"boxes": (box.reshape(2, 2) * scale).reshape(4).astype(np.float32)}
    with torch.no_grad(), autocast(where, precision):
        mask = predict_mask(sam, sam.backbone_features(resized[None]), prompt)
    return np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))


def _annotate_official(image, points, labels, box, path, device, precision) -> np.ndarray:
    import torch

    from potpourri.core.training import autocast
    from potpourri.models.sam import build_official_sam

    model = build_official_sam(path).to(device)
    module = type(model).__module__.split(".")[0]  # segment_anything or mobile_sam
    predictor = __import__(module, fromlist=["SamPredictor"]).SamPredictor(model)
    with torch.no_grad(), autocast(device, precision):  # the heavy image encoder in ``precision``
        predictor.set_image(image)
    predictor.features = predictor.features.float()  # the light decoder in fp32 (its outputs become NumPy)
    masks, scores, _ = predictor.predict(
        point_coords=points if len(points) else None,
        point_labels=labels if len(points) else None,
        box=box,
        multimask_output=len(points) == 1 and box is None,
    )
    return masks[int(np.argmax(scores))].astype(bool)


def write_mask(mask: np.ndarray, class_id: int, out: str) -> Path:
    from potpourri.core.io import atomic_write_bytes

    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * np.uint8(class_id), mode="L").save(buffer, format="PNG")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path
