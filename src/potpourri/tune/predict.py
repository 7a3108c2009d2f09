"""``potpourri predict``: classify images with a registered (or timm) model and write a run with a report."""

from __future__ import annotations

import os
from functools import cache

import torch

from potpourri.core.errors import PotpourriError
from potpourri.core.imaging import find_images, load_rgb
from potpourri.core.io import write_csv
from potpourri.core.registry import REGISTRY, create_model, get_pretrained_cfg
from potpourri.core.runs import Run, new_run
from potpourri.data.transforms import eval_transform
from potpourri.report.html import Report

__all__ = ["class_names", "predict_images"]


@cache
def _imagenet_names() -> tuple[str, ...]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i) for i in range(1000))


def class_names(label_set: str | None, num_classes: int) -> list[str]:
    """Readable class names: ImageNet descriptions for ``imagenet``, else ``class_<i>``."""
    if label_set == "imagenet" and num_classes == 1000:
        return list(_imagenet_names())
    return [f"class_{i}" for i in range(num_classes)]


@torch.no_grad()
def predict_images(
    model_name: str,
    images: list[str | os.PathLike],
    *,
    topk: int = 5,
    weights: str | None = None,
    out: str | os.PathLike | None = None,
    batch_size: int = 16,
) -> Run:
    """Top-k predictions for every image (files or folders); writes ``predictions.csv`` and ``report.html``.

    Example:
        run = predict_images("efficientnet_lite0", ["cat.jpg"], topk=3)
    """
    if topk < 1:
        raise PotpourriError(f"--topk must be at least 1, got {topk}")
    paths = find_images(images)
    pictures = [load_rgb(p) for p in paths]  # fail on a bad file before the model is built
    cfg = get_pretrained_cfg(model_name)
    if model_name in REGISTRY and REGISTRY[model_name].modality != "image":
        raise PotpourriError(f"model '{model_name}' encodes text, not images; pick an image model (`potpourri list`)")
    model = create_model(model_name, pretrained=weights is None, weights=weights).eval()
    transform = eval_transform(cfg)
    names = class_names(cfg.label_set if cfg else "imagenet", model.num_classes)
    topk = min(topk, model.num_classes)

    run = new_run(
        "predict",
        out,
        config={"model": model_name, "images": [str(p) for p in paths], "topk": topk, "weights": weights},
    )
    rows = []
    for start in range(0, len(pictures), batch_size):
        batch = torch.stack([transform(img) for img in pictures[start : start + batch_size]])  # (B, 3, H, W)
        probs = model(batch).softmax(-1)  # (B, num_classes)
        top_p, top_i = probs.topk(topk, dim=-1)
        for offset, (p_row, i_row) in enumerate(zip(top_p.tolist(), top_i.tolist(), strict=True)):
            top = [{"index": i, "label": names[i], "prob": p} for p, i in zip(p_row, i_row, strict=True)]
            rows.append({"image": str(paths[start + offset]), "top": top})
            run.log_metrics(
                {"image": str(paths[start + offset]), "top1": i_row[0], "label": names[i_row[0]], "prob": p_row[0]}
            )
    table = [{"image": r["image"], **{f"{k}{n + 1}": t[k] for n, t in enumerate(r["top"]) for k in ("label", "prob")}}
             for r in rows]  # fmt: skip
    write_csv(run.path / "predictions.csv", table)  # image, label1, prob1, label2, prob2, ...
    run.write_summary({"model": model_name, "predictions": rows})

    report = Report(f"potpourri predict — {model_name}")
    report.section("Predictions", f"{len(rows)} images, top-{topk} classes.")
    for picture, row in zip(pictures, rows, strict=True):
        thumb = run.images / f"{len(report.parts):04d}.png"
        picture.copy().resize((160, int(160 * picture.height / max(picture.width, 1)))).save(thumb)
        caption = "; ".join(f"{t['label'].split(',')[0]} {t['prob']:.2f}" for t in row["top"][:3])
        report.image(thumb, caption, width=200)
    report.write(run.path / "report.html")
    return run
