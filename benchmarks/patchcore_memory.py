"""PatchCore fit memory at 40 and 1,000 training images (224 px): peak RSS of a fresh process and the stored bank.

Each size runs in its own child process (so one peak never hides another): it imports potpourri, builds the
offline Lite0, fits PatchCore with the default config on PNG crops of ``photo_sets`` retina (written to a temporary
folder first, so the child holds no image array), saves the run and reports its peak RSS, the RSS before the fit
(imports + backbone), the fit time, and the memory bank's rows and bytes on disk next to ``memory_budget``.
Run: ``PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/patchcore_memory.py --sizes 40 1000``.
``--nproc N`` fits under ``torchrun --nproc-per-node N`` (gloo, one thread per process): one line per rank with
its own peak RSS and fit time, plus the launch's wall time; the bank equals the one-process partitioned bank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(folder: Path, out: Path, overrides: dict) -> dict:
    """Fit on every PNG in ``folder`` and save the run to ``out``; the measurements as a dict."""
    import torch

    torch.set_num_threads(1)
    from potpourri.core.distributed import join
    from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig, memory_budget

    group = join("cpu")  # under torchrun: this process fits its share of the coreset slices
    model = PatchCore(PatchCoreConfig(**overrides))
    model.features  # noqa: B018  (loads the backbone before the baseline is read)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    images = sorted(folder.glob("*.png"))
    start = time.perf_counter()
    model.fit(images)
    fit_s = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if group.is_main:
        model.save(out)
    group.barrier()
    stored = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    group.destroy()
    budget = memory_budget(model.config, len(images), model.grid())
    budget = {k: round(v / 1e6, 1) for k, v in budget.items() if k != "patches"}
    return {"rank": group.rank, "world": group.world, "images": len(images), "rss_before_fit_MiB": round(before),
            "fit_peak_rss_MiB": round(peak),
            "fit_peak_rss_MB": round(peak * 1.048576), "fit_s": round(fit_s, 1), "timings": model.timings,
            "bank_rows": int(model.memory_bank.shape[0]), "bank_dtype": model.config.bank_dtype,
            "bank_file_MB": round(stored / 1e6, 2), "budget_MB": budget}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[40, 1000])
    parser.add_argument("--set", default="retina", help="a potpourri.data.photo_sets name")
    parser.add_argument("--config", default="{}", help="PatchCoreConfig overrides as JSON, e.g. '{\"embed_dim\": 152}'")
    parser.add_argument("--nproc", type=int, default=1, help="processes under torchrun (1: a plain child process)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.child_out, json.loads(args.config))), flush=True)
        return
    from PIL import Image

    from potpourri.data.photo_sets import make_image

    load_start = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            folder = Path(tmp) / f"train{size}"
            folder.mkdir()
            for index in range(size):
                Image.fromarray(make_image(args.set, "train", index, seed=0)[0]).save(folder / f"{index:04d}.png")
            command = [sys.executable, __file__, "--child", str(folder), "--child-out", str(Path(tmp) / f"run{size}"),
                       "--config", args.config]  # fmt: skip
            if args.nproc > 1:
                launcher = Path(sys.executable).with_name("torchrun")
                command = [str(launcher), "--standalone", f"--nproc-per-node={args.nproc}", "--no-python", *command]
            env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
            start = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            wall = time.perf_counter() - start
            if result.returncode:
                sys.exit(f"child for {size} images failed:\n{result.stderr[-2000:]}")
            for line in [ln for ln in result.stdout.splitlines() if ln.startswith('{"rank"')]:
                print(line, flush=True)
            print(json.dumps({"images": size, "nproc": args.nproc, "launch_wall_s": round(wall, 1)}), flush=True)
    load = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps({"config": json.loads(args.config), "load_start": load_start, "load_end": load}), flush=True)


if __name__ == "__main__":
    main()
