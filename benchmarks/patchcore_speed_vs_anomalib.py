"""Predict throughput of our PatchCore (eager, ONNX Runtime, OpenVINO f32 / bf16) against anomalib 2.7.0's, at batch 1
on the same images, at 1 and 2 threads, with every backend's image AUROC on the same test set.

Both methods are fitted on one set (default ``photo:retina`` seed 0, 40 images) with the drivers of
``benchmarks/anomalib_patchcore.py`` (same weights, layers, coreset ratio). Ours is exported as the deployment bundle
(``deploy.inspect_export``) and run through the bundle's own ``inspect_runtime.Inspector``; every candidate gets
the same decoded 224 px images and normalises them itself (decoding and resizing are outside every timing).
Candidates are interleaved (``core.timing.interleaved_timings``); each round scores ``--images`` test images one by
one. Load average before and after is printed. Needs the anomalib venv:
    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 5 /work/anomalib-venv/bin/python benchmarks/patchcore_speed_vs_anomalib.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from anomalib_patchcore import anomalib_fit, build_anomalib, load_images, set_folder, to_batch

from potpourri import create_model
from potpourri.core.metrics import image_auroc
from potpourri.core.timing import interleaved_timings, quartiles, retain_freed_memory
from potpourri.data.folders import read_folder
from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig


def runtime_module(bundle: Path):
    """The bundle's own ``inspect_runtime.py`` (what a deployment imports)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bundle_runtime", bundle / "inspect_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="photo:retina")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--images", type=int, default=4, help="test images scored (batch 1) per timed call")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    from potpourri.deploy.inspect_export import export_patchcore

    load_start = [round(v, 2) for v in os.getloadavg()]
    # anomalib's k-center greedy grows RSS without bound under glibc's default thresholds (one fit reached 14 GB):
    # fit with every large temporary its own mapping, returned on free, then time every candidate with freed
    # memory kept for reuse (the same allocator for all of them; no page faults in the eager forwards)
    retain_freed_memory(mmap_threshold_mb=1, trim_threshold_mb=1)
    torch.set_num_threads(1)
    data = read_folder(str(set_folder(args.set, args.seed)))
    train, test = load_images(data.train, 224), load_images(data.test, 224)
    labels = np.asarray(data.labels)
    backbone = create_model("efficientnet_lite0", pretrained=True).eval()
    mean, std = tuple(backbone.pretrained_cfg["mean"]), tuple(backbone.pretrained_cfg["std"])
    ours = PatchCore(PatchCoreConfig(seed=args.seed), backbone=backbone).fit(train)
    theirs = build_anomalib(backbone.state_dict(), 0.1)
    torch.manual_seed(args.seed)
    anomalib_fit(theirs, train, 0.1, mean, std, 8)
    tmp = Path(tempfile.mkdtemp())
    ours.save(tmp / "run")
    export_patchcore(tmp / "run", tmp / "bundle", check_images=test[:2])
    runtime = runtime_module(tmp / "bundle")
    retain_freed_memory()

    def anomalib_scores(images):
        with torch.inference_mode():
            return [float(theirs(to_batch([image], mean, std)).pred_score.reshape(-1)[0]) for image in images]

    def scorer(score):  # batch 1, as a camera on a line delivers parts
        return lambda images: [float(score([image])[0][0]) for image in images]

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        candidates = {"anomalib eager": anomalib_scores, "ours eager": scorer(ours.score)}
        for backend, precision in (("onnxruntime", "f32"), ("openvino", "f32"), ("openvino", "bf16")):
            inspector = runtime.Inspector(tmp / "bundle", backend=backend, threads=threads, precision=precision)
            candidates[f"ours {backend} {precision}"] = scorer(inspector.score)
        aurocs = {name: image_auroc(labels, np.asarray(call(test))) for name, call in candidates.items()}
        timed = {name: (lambda call=call: call(test[: args.images])) for name, call in candidates.items()}
        timings = interleaved_timings(timed, rounds=args.rounds, warmup=1)
        reference = quartiles(timings["anomalib eager"])[1]
        for name, values in timings.items():
            q1, median, q3 = quartiles(values)
            row = {"threads": threads, "candidate": name, "ms_per_image": round(median / args.images * 1e3, 2),
                   "iqr_ms": [round(q1 / args.images * 1e3, 2), round(q3 / args.images * 1e3, 2)],
                   "speedup_vs_anomalib": round(reference / median, 2), "image_auroc": round(aurocs[name], 4),
                   "auroc_minus_ours_eager": round(aurocs[name] - aurocs["ours eager"], 4)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    load = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps({"set": args.set, "test_images": len(test), "bank_rows": int(ours.memory_bank.shape[0]),
                      "load_start": load_start, "load_end": load}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
