"""Our PatchCore vs anomalib 2.7.0's PatchCore, same EfficientNet-Lite0 weights, same inputs, same metrics.

Both methods see the same 224 px images (bicubic resize, Lite0 normalisation), use blocks 2 and 4, a 3×3 average,
a 10 % greedy coreset, 9-neighbour image-score reweighting and σ=4 map smoothing; both are scored with
``potpourri.core.metrics`` (image AUROC, pixel AUROC, AUPRO). anomalib's ``PatchcoreModel`` (its torch model) is
driven directly: training-mode forward passes fill its embedding store, ``subsample_embedding`` runs its k-center
greedy coreset, eval-mode forward passes give scores and maps. Sets: DS-Synth categories (``ds-synth:brick``) and
the held-out photo sets of ``potpourri.data.photo_sets`` (``photo:retina``); each seed regenerates the set and
seeds both coresets. ``--variants`` are our configs, each a suspect changed alone (``VARIANTS``); methods alternate
order per (set, seed); threads are pinned; the last lines are mean ± std over seeds per set and method.

Runs in a separate venv with anomalib (it is not a potpourri dependency). Issue 21 used a venv that reuses the
project venv's torch through a ``.pth`` file (so both methods run the same torch build) and adds anomalib:
    python3 -m venv /work/anomalib-venv
    echo /work/main/.venv/lib/python3.11/site-packages > /work/anomalib-venv/lib/python3.11/site-packages/zz.pth
    /work/anomalib-venv/bin/pip install anomalib==2.7.0
    PYTHONPATH=src OMP_NUM_THREADS=1 /work/anomalib-venv/bin/python benchmarks/anomalib_patchcore.py --threads 1
Stock anomalib's coreset loop fragments glibc's heap (~20 MB per step; issue 21 saw 14 GB RSS at 31,360 patches),
so the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=1048576`` (every large temporary is its own mapping,
returned on free) and ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (those mappings use transparent huge pages: without
it the page faults make anomalib's coreset 5x slower; with it, 940 steps on 31,360 x 152 took 6.9 s against 7.8 s
stock and 38.8 s mmap-only, at a flat 1.16 GB). ``--no-mmap-threshold`` keeps the stock allocator.
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
from potpourri.core.metrics import aupro, image_auroc, pixel_auroc
from potpourri.data.folders import ds_synth_category, read_folder
from potpourri.data.photo_sets import photo_set
from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig

SETS = ("ds-synth:brick", "ds-synth:grass", "ds-synth:gravel", "ds-synth:moon", "ds-synth:tissue",
        "photo:retina", "photo:stars", "photo:coins")  # fmt: skip
# our PatchCoreConfig overrides, one suspect at a time (Lite0 blocks 2 + 4 have 152 channels: 152 = no pooling)
VARIANTS: dict[str, dict] = {
    "ours": {},
    "pooled_128": {"embed_dim": 128},  # the default before issue 21 (channels averaged 152 -> 128)
    "ours_fp32_bank": {"bank_dtype": "float32"},
    "no_pool": {"embed_dim": 152},
    "exact_coreset": {"projection_dim": None},
    "no_pool_exact": {"embed_dim": 152, "projection_dim": None},
    "no_pool_proj128": {"embed_dim": 152, "projection_dim": 128},
    "nearest_map": {"map_upsample": "nearest"},
    "no_pool_nearest_map": {"embed_dim": 152, "map_upsample": "nearest"},
}
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


def set_folder(spec: str, seed: int) -> Path:
    """The MVTec-layout folder of ``ds-synth:<category>`` or ``photo:<name>`` generated with ``seed``."""
    kind, name = spec.split(":", 1)
    return ds_synth_category(name, seed=seed) if kind == "ds-synth" else photo_set(name, seed=seed)


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


def run_ours(config: PatchCoreConfig, backbone, train, test) -> dict:
    model = PatchCore(config, backbone=backbone)
    model.embed(train[:2])  # warm-up (and builds the extractor), as for anomalib below
    start = time.perf_counter()
    model.fit(train)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores, maps = model.score(test)
    predict_s = time.perf_counter() - start
    return {"model": model, "fit_s": fit_s, "predict_s": predict_s, "scores": scores, "maps": maps,
            "bank": int(model.memory_bank.shape[0]), "coreset_s": model.timings["coreset_s"]}  # fmt: skip


def run_theirs(state, args, seed, mean, std, train, test) -> dict:
    model = build_anomalib(state, args.coreset_ratio)
    with torch.inference_mode():
        model.feature_extractor(to_batch(train[:2], mean, std))  # warm-up
    torch.manual_seed(seed)  # anomalib seeds its coreset and projection from the global generator
    start = time.perf_counter()
    anomalib_fit(model, train, args.coreset_ratio, mean, std, args.batch_size)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scores, maps = anomalib_score(model, test, mean, std, args.batch_size)
    predict_s = time.perf_counter() - start
    return {"model": model, "fit_s": fit_s, "predict_s": predict_s, "scores": scores, "maps": maps,
            "bank": int(model.memory_bank.shape[0])}  # fmt: skip


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    """Mean ± std over seeds of every metric, per set and method, with the difference to anomalib's mean."""
    out = []
    for spec in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == spec]
        line: dict = {"set": spec, "seeds": len(mine)}
        for method in methods:
            line[method] = {}
            for key in ("image_auroc", "pixel_auroc", "aupro", "fit_s"):
                values = np.array([r[method][key] for r in mine])
                line[method][key] = f"{values.mean():.3f} ± {values.std():.3f}"
                if method != "anomalib":
                    reference = np.mean([r["anomalib"][key] for r in mine])
                    line[method][f"{key}_vs_anomalib"] = round(float(values.mean() - reference), 3)
        out.append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), help="ds-synth:<category> or photo:<name>")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-mmap-threshold", action="store_true", help="keep glibc's default (anomalib may OOM)")
    parser.add_argument("--out", type=Path, help="also write the rows and the summary as JSON here")
    args = parser.parse_args()
    if not args.no_mmap_threshold and MMAP_ENV not in os.environ:  # must be set before the process starts
        quiet = {"TQDM_DISABLE": "1"}  # anomalib's per-step coreset bar would flood the log
        allocator = {MMAP_ENV: "1048576", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **allocator, **quiet})
    try:
        import anomalib
    except ImportError as exc:
        raise PotpourriError("needs anomalib: run in a venv with `pip install anomalib==2.7.0` (see --help)") from exc
    torch.set_num_threads(args.threads)
    load_start = [round(v, 2) for v in os.getloadavg()]
    backbone = create_model("efficientnet_lite0", pretrained=True).eval()
    state = backbone.state_dict()
    mean, std = tuple(backbone.pretrained_cfg["mean"]), tuple(backbone.pretrained_cfg["std"])
    print(json.dumps({"anomalib": anomalib.__version__, "torch": torch.__version__, "threads": args.threads,
                      MMAP_ENV: os.environ.get(MMAP_ENV), "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
                      "load_start": load_start}), flush=True)  # fmt: skip

    rows, turn = [], 0
    methods = ["anomalib", *args.variants]
    for spec in args.sets:
        for seed in args.seeds:
            data = read_folder(str(set_folder(spec, seed)))
            train = load_images(data.train, args.image_size)
            test = load_images(data.test, args.image_size)
            labels = np.asarray(data.labels)
            masks = load_masks(data.mask_paths, args.image_size)
            order = methods[turn % len(methods) :] + methods[: turn % len(methods)]  # rotate who runs first
            turn += 1
            results = {}
            for method in order:
                np.random.seed(seed)
                if method == "anomalib":
                    results[method] = run_theirs(state, args, seed, mean, std, train, test)
                else:
                    config = PatchCoreConfig(image_size=args.image_size, coreset_ratio=args.coreset_ratio, seed=seed,
                                             batch_size=args.batch_size, **VARIANTS[method])  # fmt: skip
                    results[method] = run_ours(config, backbone, train, test)
            parity = feature_parity(results[args.variants[0]]["model"], results["anomalib"]["model"],
                                    to_batch(test[:2], mean, std))  # fmt: skip
            row = {"set": spec, "seed": seed, "train": len(train), "test": len(test), "order": "/".join(order),
                   "feature_max_abs_diff": parity}  # fmt: skip
            for method in methods:
                result = results[method]
                row[method] = {
                    "image_auroc": round(image_auroc(labels, result["scores"]), 4),
                    "pixel_auroc": round(pixel_auroc(masks, result["maps"]), 4),
                    "aupro": round(aupro(masks, result["maps"]), 4),
                    "fit_s": round(result["fit_s"], 2),
                    "predict_images_per_s": round(len(test) / result["predict_s"], 2),
                    "memory_bank_rows": result["bank"],
                }
                if "coreset_s" in result:
                    row[method]["coreset_s"] = round(result["coreset_s"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = summarise(rows, methods)
    for line in summary:
        print(json.dumps(line), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load = [round(v, 2) for v in os.getloadavg()]  # other workers share the cores: every time above is skewed
    print(json.dumps({"peak_rss_MiB": round(peak, 1), "load_start": load_start, "load_end": load}), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
