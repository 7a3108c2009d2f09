"""``potpourri predict``: classify images with a registered (or timm) model, or with a ``tune`` run in its own
classes and with its own transform; writes a run with ``predictions.csv`` and a report.

A tune run is reloadable because its ``metadata.json`` (format ``potpourri.classifier``) records the registry name,
the constructor arguments, the classes, the input size and normalisation and the strategy; ``load_classifier``
rebuilds the model from it and loads ``model.safetensors`` strictly (a mismatching key is one clear error).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from potpourri.core.errors import PotpourriError
from potpourri.core.imaging import ImageInput, as_rgb, find_images, load_rgb
from potpourri.core.io import atomic_write_bytes, load_state_dict_file, write_csv
from potpourri.core.registry import REGISTRY, create_model, get_pretrained_cfg
from potpourri.core.runs import Run, environment, new_run
from potpourri.core.weights import PretrainedCfg
from potpourri.data.transforms import eval_transform
from potpourri.report.html import Report

__all__ = [
    "CLASSIFIER_FORMAT",
    "Classifier",
    "class_names",
    "load_classifier",
    "load_strict",
    "plain_state_dict",
    "predict_images",
    "write_classifier_metadata",
]

CLASSIFIER_FORMAT = "potpourri.classifier"
CPU = torch.device("cpu")
FORMAT_VERSION = 1


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


# ----------------------------------------------------------------------------------------------------------------
# the predictor


@dataclass
class Classifier:
    """A model with its classes and input transform: ``predict(images)`` gives the top-k classes per image."""

    model: nn.Module
    classes: list[str]
    cfg: PretrainedCfg  # mean/std/interpolation/crop_pct/input size the model was trained with
    name: str
    device: torch.device = CPU
    precision: str = "fp32"
    kind: str = "classifier"

    @property
    def image_size(self) -> int:
        return int(self.cfg.input_size[-1])

    def transform(self) -> Any:
        return eval_transform(self.cfg)

    @torch.no_grad()
    def predict(self, images: list[ImageInput], *, topk: int = 5, batch_size: int = 16) -> list[dict[str, Any]]:
        """Top-``topk`` ``{"index", "label", "prob"}`` per image (best first), as ``{"label", "prob", "top"}``."""
        from potpourri.core.training import autocast

        transform = self.transform()
        topk = min(topk, len(self.classes))
        self.model.eval().to(self.device)
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(as_rgb(img)) for img in images[start : start + batch_size]])
            with autocast(self.device, self.precision):
                logits = self.model(batch.to(self.device))  # (B, K)
            probs = logits.float().softmax(-1).cpu()
            top_p, top_i = probs.topk(topk, dim=-1)
            for p_row, i_row in zip(top_p.tolist(), top_i.tolist(), strict=True):
                top = [{"index": i, "label": self.classes[i], "prob": p} for p, i in zip(p_row, i_row, strict=True)]
                out.append({"label": top[0]["label"], "prob": top[0]["prob"], "top": top})
        return out


def pretrained_classifier(model_name: str, *, weights: str | None = None) -> Classifier:
    """A registered or timm model with its pretrained classes (ImageNet names when it has them)."""
    cfg = get_pretrained_cfg(model_name)
    if model_name in REGISTRY and REGISTRY[model_name].modality != "image":
        raise PotpourriError(f"model '{model_name}' encodes text, not images; pick an image model (`potpourri list`)")
    model = create_model(model_name, pretrained=weights is None, weights=weights).eval()
    names = class_names(cfg.label_set if cfg else "imagenet", model.num_classes)
    return Classifier(model, names, cfg or PretrainedCfg(name=model_name), model_name)


# ----------------------------------------------------------------------------------------------------------------
# tune runs: metadata and loading


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every LoRA adapter merged into its base layer (W + scale·B·A), under the plain
    model's key names; other models are returned unchanged."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if base is None or not hasattr(module, "get_delta_weight"):
            continue
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith((f"{prefix}base_layer.", f"{prefix}lora_"))]:
            del state[key]
        with torch.no_grad():
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
            state[f"{prefix}weight"] = base.weight.detach() + delta
        if base.bias is not None:
            state[f"{prefix}bias"] = base.bias.detach()
    return state


def write_classifier_metadata(
    folder: str | os.PathLike,
    *,
    model_name: str,
    classes: list[str],
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    strategy: str,
    builder: dict[str, Any] | None = None,
) -> Path:
    """Write ``metadata.json``: everything ``load_classifier`` needs to rebuild the tuned model."""
    metadata = {
        "format": CLASSIFIER_FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "classifier",
        "model": model_name,
        "model_args": {"num_classes": len(classes)},
        "builder": builder,
        "strategy": strategy,
        "classes": list(classes),
        "input": {
            "size": [3, image_size, image_size],
            "mean": list(mean),
            "std": list(std),
            "interpolation": "bilinear",
            "crop_pct": 1.0,  # short side to the input size, centre crop: what tune trained on
        },
        "weights": "model.safetensors",
        "versions": environment(),
    }
    path = Path(folder) / "metadata.json"
    atomic_write_bytes(path, json.dumps(metadata, indent=2).encode())
    return path


def read_classifier_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """``metadata.json`` of a tune run, checked; a folder of another verb is one clear error."""
    path = Path(folder) / "metadata.json"
    if not path.is_file():
        raise PotpourriError(
            f"'{folder}' is not a tune run (no metadata.json); tune one with `potpourri tune --out DIR`"
        )
    metadata = json.loads(path.read_text())
    if metadata.get("format") != CLASSIFIER_FORMAT:
        raise PotpourriError(f"'{folder}' holds a '{metadata.get('format')}' run, not a tuned classifier")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise PotpourriError(f"'{folder}' was written in classifier format {metadata.get('format_version')}; retune")
    return metadata


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` into ``model`` with every key and shape matching; otherwise one line naming the keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{label} {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}")
        if shapes:
            k = shapes[0]
            parts.append(f"shape of {k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model")
        raise PotpourriError(f"'{source}' does not fit {type(model).__name__}: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)
    return model


def load_classifier(folder: str | os.PathLike, *, device: str = "cpu", precision: str = "fp32") -> Classifier:
    """Rebuild a ``potpourri tune`` run's model from its ``metadata.json`` and load its weights strictly."""
    from potpourri.core.training import check_precision, resolve_device

    folder = Path(folder)
    meta = read_classifier_metadata(folder)
    size = int(meta["input"]["size"][-1])
    if meta.get("builder") and meta["builder"].get("name") == "visual-prompt":
        from potpourri.tune.visual_prompt import VPConfig, build_visual_prompt

        source = create_model(meta["model"], pretrained=False)
        vp = VPConfig("fully", width=int(meta["builder"]["width"]))
        model = build_visual_prompt(source, len(meta["classes"]), vp, canvas=size)
    else:
        model = create_model(meta["model"], pretrained=False, **meta["model_args"])
    if meta.get("builder") and meta["builder"].get("name") == "siamese-subtuning":
        from potpourri.models.siamese import SiameseSubTuned

        model = SiameseSubTuned(model, len(meta["classes"]))
    weights = folder / meta["weights"]
    load_strict(model, load_state_dict_file(weights, fix="the run is incomplete; retune it"), str(weights))
    cfg = PretrainedCfg(
        name=meta["model"],
        input_size=tuple(meta["input"]["size"]),
        mean=tuple(meta["input"]["mean"]),
        std=tuple(meta["input"]["std"]),
        crop_pct=float(meta["input"]["crop_pct"]),
        interpolation=meta["input"]["interpolation"],
    )
    resolved = resolve_device(device)
    check_precision(precision, resolved)
    return Classifier(model.eval().to(resolved), list(meta["classes"]), cfg, str(folder), resolved, precision)


# ----------------------------------------------------------------------------------------------------------------
# the verb


@torch.no_grad()
def predict_images(
    model_name: str | None,
    images: list[str | os.PathLike],
    *,
    topk: int = 5,
    weights: str | None = None,
    run: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    precision: str = "fp32",
) -> Run:
    """Top-k predictions for every image (files or folders) by a pretrained model or a tune ``run``; writes
    ``predictions.csv`` and ``report.html``.

    Example:
        run = predict_images("efficientnet_lite0", ["cat.jpg"], topk=3)
    """
    from potpourri.core.distributed import join
    from potpourri.core.training import check_precision, resolve_device

    if topk < 1:
        raise PotpourriError(f"--topk must be at least 1, got {topk}")
    if (model_name is None) == (run is None):
        raise PotpourriError("give a model name or --run RUN (a `potpourri tune` folder), not both")
    if run is not None and weights is not None:
        raise PotpourriError("--weights does not apply with --run: the run's own weights are used")
    paths = find_images(images)
    pictures = [load_rgb(p) for p in paths]  # fail on a bad file before the model is built
    if run is not None:
        classifier = load_classifier(run, device=device, precision=precision)
    else:
        classifier = pretrained_classifier(model_name, weights=weights)
        classifier.device = resolve_device(device)
        check_precision(precision, classifier.device)
        classifier.precision = precision
    name = model_name or f"run {run}"
    topk = min(topk, len(classifier.classes))
    config = {"model": model_name, "run": None if run is None else str(run), "images": [str(p) for p in paths]}
    group = join(classifier.device)  # torchrun: each process classifies its block of batches, rank 0 writes
    try:
        out_run = group.main_first(
            lambda: new_run("predict", out, config={**config, "topk": topk, "weights": weights, "device": device})
        )
        first, stop = group.batch_block(len(pictures), batch_size)
        parts = group.all_gather_object(classifier.predict(pictures[first:stop], topk=topk, batch_size=batch_size))
    finally:
        group.destroy()
    if not group.is_main:
        group.after_main_writes()
        return out_run
    predictions = [prediction for part in parts for prediction in part]
    rows = []
    for path, pred in zip(paths, predictions, strict=True):
        rows.append({"image": str(path), "top": pred["top"]})
        top1 = pred["top"][0]
        out_run.log_metrics({"image": str(path), "top1": top1["index"], "label": top1["label"], "prob": top1["prob"]})
    table = [{"image": r["image"], **{f"{k}{n + 1}": t[k] for n, t in enumerate(r["top"]) for k in ("label", "prob")}}
             for r in rows]  # fmt: skip
    write_csv(out_run.path / "predictions.csv", table)  # image, label1, prob1, label2, prob2, ...
    out_run.write_summary({"model": model_name, "run": config["run"], "predictions": rows})

    report = Report(f"potpourri predict — {name}")
    report.section("Predictions", f"{len(rows)} images, top-{topk} of {len(classifier.classes)} classes.")
    for picture, row in zip(pictures, rows, strict=True):
        thumb = out_run.images / f"{len(report.parts):04d}.png"
        picture.copy().resize((160, int(160 * picture.height / max(picture.width, 1)))).save(thumb)
        caption = "; ".join(f"{t['label'].split(',')[0]} {t['prob']:.2f}" for t in row["top"][:3])
        report.image(thumb, caption, width=200)
    report.write(out_run.path / "report.html")
    group.after_main_writes()
    return out_run
