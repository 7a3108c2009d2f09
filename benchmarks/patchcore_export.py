"""PatchCore's export bundle against eager PyTorch: parity (relative score/map difference, verdicts) and batch-1
latency of eager, ONNX Runtime and OpenVINO (f32 and its default precision), interleaved, one thread.

Run: ``.venv/bin/python benchmarks/patchcore_export.py [--data ds-synth:brick] [--image-size 224]``. Fits PatchCore
(offline Lite0) on the data's good images, exports the bundle, and prints one line per backend: median ms
(interquartile range) and the ratio to eager, plus the load average before and after.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="ds-synth:brick")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from potpourri.core.timing import interleaved_timings, quartiles
    from potpourri.data.folders import read_folder
    from potpourri.deploy.inspect_export import export_patchcore
    from potpourri.inspect.patchcore import PatchCoreConfig
    from potpourri.inspect.pipeline import fit_folder

    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp())
    config = PatchCoreConfig(image_size=args.image_size)
    fit_folder(data_spec=args.data, method_name="patchcore", config=config, out=str(tmp / "run"), threads=1)
    images = read_folder(args.data).test
    meta = export_patchcore(tmp / "run", tmp / "bundle", check_images=images)
    print(f"{len(images)} test images of {args.data} at {args.image_size} px; bank {meta['memory_bank_rows']} rows")
    for backend, parity in meta["parity"].items():
        if isinstance(parity, dict):
            print(f"parity {backend:<12} score rel diff {parity['score_rel_diff']:.1e}  map rel diff "
                  f"{parity['map_rel_diff']:.1e}  same verdicts {parity['same_verdicts']}")  # fmt: skip

    from potpourri.inspect.base import load_method

    method = load_method(tmp / "run")
    spec = importlib.util.spec_from_file_location("bundle_runtime", tmp / "bundle" / "inspect_runtime.py")
    runtime = importlib.util.module_from_spec(spec)
    sys.modules["bundle_runtime"] = runtime
    spec.loader.exec_module(runtime)
    one = [images[0]]
    candidates = {"eager": lambda: method.score(one)}
    candidates["onnxruntime"] = _scorer(runtime.Inspector(tmp / "bundle", threads=1), one)
    if importlib.util.find_spec("openvino"):
        ov = runtime.Inspector(tmp / "bundle", backend="openvino", threads=1)
        candidates["openvino f32"] = _scorer(ov, one)
        ov_default = runtime.Inspector(tmp / "bundle", backend="openvino", threads=1, precision="bf16")
        candidates["openvino bf16"] = _scorer(ov_default, one)
        scores_bf16, _ = ov_default.score(images)
        scores, _ = method.score(images)
        print(f"openvino bf16 score rel diff {np.abs(scores - scores_bf16).max() / np.abs(scores).max():.1e}")
    timings = interleaved_timings(candidates, rounds=args.rounds)
    eager = quartiles(timings["eager"])[1]
    for name, values in timings.items():
        q1, median, q3 = quartiles(values)
        print(f"{name:<14} {median * 1e3:7.2f} ms  (IQR {q1 * 1e3:.2f}-{q3 * 1e3:.2f})  {eager / median:5.2f}x eager")
    print(f"load average before/after: {load_before:.2f}/{os.getloadavg()[0]:.2f}")


def _scorer(inspector, images):
    return lambda: inspector.score(images)


if __name__ == "__main__":
    main()
