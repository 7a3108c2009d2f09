"""Our PatchCore vs anomalib 2.7.0's PatchCore on DS-Synth, same EfficientNet-Lite0 weights, same inputs, same metrics.

Both methods see the same 224 px images (bicubic resize, Lite0 normalisation), use blocks 2 and 4, a 3×3 average,
a 10 % greedy coreset, 9-neighbour image-score reweighting and σ=4 map smoothing; both are scored with
``potpourri.core.metrics``. anomalib's ``PatchcoreModel`` (its torch model) is driven directly: training-mode
forward passes fill its embedding store, ``subsample_embedding`` runs its k-center greedy coreset, eval-mode
forward passes give scores and maps. Ours and anomalib alternate order per category; threads are pinned.
``ours_zero_pad`` is an ablation: our PatchCore with anomalib's border averaging (``count_include_pad=True``).

Runs in a separate venv with anomalib (it is not a potpourri dependency):
    python3 -m venv /tmp/anomalib-venv && /tmp/anomalib-venv/bin/pip install anomalib==2.7.0 torch torchvision timm
    PYTHONPATH=src /tmp/anomalib-venv/bin/python benchmarks/anomalib_patchcore.py --threads 2
Stock anomalib's coreset loop fragments glibc's heap (~20 MB per step) and runs out of memory on 24 GB, so the
script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=1048576`` unless that is already set (it also slows
anomalib's coreset selection; ``--no-mmap-threshold`` keeps the stock allocator).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from potpourri import PotpourriError, create_model
from potpourri.core.metrics import image_auroc, pixel_auroc
from potpourri.data.folders import ds_synth_category, read_folder
from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig

CATEGORIES = ("brick", "grass", "gravel", "moon", "tissue")
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def load_images(paths: list[Path], size: int) -> list[Image.Image]:
    """RGB images at ``size``² (bicubic), decoded once so neither method's timing includes disk reads."""
    out = []
    for path in paths:
        with Image.open(path) as image:
            out.append(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
    return out


def load_masks(paths: list[Path | None], size: int) -> np.ndarray:
    """Binary (N, S, S) ground truth (nearest resize); all-zero for good images."""
    masks = np.zeros((len(paths), size, size), dtype=np.uint8)
    for index, path in enumerate(paths):
        if path is not None:
            with Image.open(path) as mask:
                masks[index] = np.asarray(mask.convert("L").resize((size, size), Image.Resampling.NEAREST)) > 0
    return masks


def to_batch(images: list[Image.Image], mean: tuple, std: tuple) -> torch.Tensor:
    """(B, 3, S, S) normalised like ``PatchCore._tensor`` (the same arithmetic for both methods)."""
    x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255.0 for i in images])).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def build_anomalib(state: dict[str, torch.Tensor], coreset_ratio: float) -> torch.nn.Module:
    """anomalib's PatchcoreModel on tf_efficientnet_lite0 with our tensors loaded by name (no download)."""
    from anomalib.models import Patchcore

    lightning = Patchcore(
        backbone="tf_efficientnet_lite0",
        layers=["blocks.2", "blocks.4"],
        pre_trained=False,
        coreset_sampling_ratio=coreset_ratio,
        num_neighbors=9,
    )
    extractor = lightning.model.feature_extractor.feature_extractor
    target = extractor.state_dict()
    mapped = {k: state[k] for k in target if k in state and state[k].shape == target[k].shape}
    missing = [k for k in target if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing:
        raise PotpourriError(f"{len(missing)} anomalib feature-extractor tensors have no match, e.g. {missing[0]}")
    extractor.load_state_dict(mapped, strict=False)
    return lightning.model.eval()


@torch.inference_mode()
def feature_parity(ours: PatchCore, theirs: torch.nn.Module, batch: torch.Tensor) -> float:
    """Max |difference| between our backbone's block-2/4 outputs and anomalib's extractor's, on the same batch."""
    features = ours.features
    x = features.stem(batch)
    taps = []
    for index, block in enumerate(features.blocks):
        x = block(x)
        if index in features.layers:
            taps.append(x)
    other = theirs.feature_extractor(batch)
    return max(float((a - b).abs().max()) for a, b in zip(taps, other.values(), strict=True))


@torch.inference_mode()
def anomalib_fit(model: torch.nn.Module, images: list[Image.Image], ratio: float, mean, std, batch: int) -> None:
    model.train()
    model.embedding_store.clear()
    for first in range(0, len(images), batch):
        model(to_batch(images[first : first + batch], mean, std))  # appends to model.embedding_store
    model.subsample_embedding(ratio)
    model.eval()


@torch.inference_mode()
def anomalib_score(model: torch.nn.Module, images: list[Image.Image], mean, std, batch: int):
    scores, maps = [], []
    for first in range(0, len(images), batch):
        out = model(to_batch(images[first : first + batch], mean, std))
        scores.append(out.pred_score.reshape(-1))
        maps.append(out.anomaly_map[:, 0])  # (B, S, S)
    return torch.cat(scores).numpy(), torch.cat(maps).numpy()


def run_ours(config: PatchCoreConfig, backbone, train, test, *, zero_pad: bool = False) -> dict:
    model = PatchCore(config, backbone=backbone)
    if zero_pad:  # ablation: anomalib's AvgPool2d(3, 1, 1) counts the zero padding at the border
        model.features.aggregate = torch.nn.AvgPool2d(config.neighbourhood, 1, config.neighbourhood // 2)
    model.embed(train[:2])  # warm-up (and builds the extractor), as for anomalib below
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores, maps = model.score(test)
    predict_s = time.perf_counter() - start
    return {"model": model, "fit_s": fit_s, "predict_s": predict_s, "scores": scores, "maps": maps,
            "bank": int(model.memory_bank.shape[0]), "coreset_s": model.timings["coreset_s"],
            "predict": lambda: model.score(test)}  # fmt: skip


def run_theirs(state, args, mean, std, train, test) -> dict:
    model = build_anomalib(state, args.coreset_ratio)
    with torch.inference_mode():
        model.feature_extractor(to_batch(train[:2], mean, std))  # warm-up
    torch.manual_seed(args.seed)  # anomalib seeds its coreset and projection from the global generator
    start = time.perf_counter()
    anomalib_fit(model, train, args.coreset_ratio, mean, std, args.batch_size)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores, maps = anomalib_score(model, test, mean, std, args.batch_size)
    predict_s = time.perf_counter() - start
    return {"model": model, "fit_s": fit_s, "predict_s": predict_s, "scores": scores, "maps": maps,
            "bank": int(model.memory_bank.shape[0]),
            "predict": lambda: anomalib_score(model, test, mean, std, args.batch_size)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", nargs="+", default=list(CATEGORIES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="predict timings per method (alternating); median")
    parser.add_argument("--no-mmap-threshold", action="store_true", help="keep glibc's default (anomalib may OOM)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    if not args.no_mmap_threshold and MMAP_ENV not in os.environ:  # must be set before the process starts
        quiet = {"TQDM_DISABLE": "1"}  # anomalib's per-step coreset bar would flood the log
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, MMAP_ENV: "1048576", **quiet})
    try:
        import anomalib
    except ImportError as exc:
        raise PotpourriError("needs anomalib: run in a venv with `pip install anomalib==2.7.0` (see --help)") from exc
    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)  # anomalib's sparse projection draws from numpy's global generator
    load_start = [round(v, 2) for v in os.getloadavg()]
    backbone = create_model("efficientnet_lite0", pretrained=True).eval()
    state = backbone.state_dict()
    mean, std = tuple(backbone.pretrained_cfg["mean"]), tuple(backbone.pretrained_cfg["std"])
    config = PatchCoreConfig(image_size=args.image_size, coreset_ratio=args.coreset_ratio, seed=args.seed)
    print(json.dumps({"anomalib": anomalib.__version__, "torch": torch.__version__, "threads": args.threads,
                      MMAP_ENV: os.environ.get(MMAP_ENV)}), flush=True)  # fmt: skip

    rows = []
    for index, category in enumerate(args.categories):
        data = read_folder(str(ds_synth_category(category)))
        train = load_images(data.train, args.image_size)
        test = load_images(data.test, args.image_size)
        labels = np.asarray(data.labels)
        masks = load_masks(data.mask_paths, args.image_size)
        order = ("ours", "anomalib", "ours_zero_pad") if index % 2 == 0 else ("anomalib", "ours", "ours_zero_pad")
        results = {}
        for method in order:
            if method == "anomalib":
                results[method] = run_theirs(state, args, mean, std, train, test)
            else:
                results[method] = run_ours(config, backbone, train, test, zero_pad=method == "ours_zero_pad")
        timings = {method: [result["predict_s"]] for method, result in results.items()}
        for _ in range(args.repeats - 1):  # alternate methods so load changes hit both alike
            for method in order:
                start = time.perf_counter()
                results[method]["predict"]()
                timings[method].append(time.perf_counter() - start)
        parity = feature_parity(results["ours"]["model"], results["anomalib"]["model"], to_batch(test[:2], mean, std))
        row = {"category": category, "train": len(train), "test": len(test), "order": "/".join(order),
               "feature_max_abs_diff": parity}  # fmt: skip
        for method, result in results.items():
            row[method] = {
                "image_auroc": round(image_auroc(labels, result["scores"]), 4),
                "pixel_auroc": round(pixel_auroc(masks, result["maps"]), 4),
                "fit_s": round(result["fit_s"], 2),
                "predict_images_per_s": round(len(test) / float(np.median(timings[method])), 2),
                "memory_bank_rows": result["bank"],
            }
        for method in ("ours", "ours_zero_pad"):
            row[method]["coreset_s"] = round(results[method]["coreset_s"], 2)
        row["throughput_ratio_ours_over_anomalib"] = round(
            row["ours"]["predict_images_per_s"] / row["anomalib"]["predict_images_per_s"], 3
        )
        row["fit_speedup_ours_over_anomalib"] = round(row["anomalib"]["fit_s"] / row["ours"]["fit_s"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load = [round(v, 2) for v in os.getloadavg()]  # other workers share the cores: every time above is skewed
    print(json.dumps({"peak_rss_MiB": round(peak, 1), "load_start": load_start, "load_end": load}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
