"""Eager latency of EfficientMod-xxs against DeiT-Tiny under glibc's default malloc and with freed memory retained
(``potpourri.core.timing.retain_freed_memory``, what ``potpourri bench`` does by default), each setting in a fresh
process so malloc's adaptive thresholds start the same; page faults per forward beside every median.

Interleaved rounds, one thread, batch 1, 224 px; load average before and after. Run on a quiet machine:
`PYTHONPATH=src .venv/bin/python benchmarks/allocator.py [--rounds 9] [--models deit_tiny_patch16_224 efficientmod_xxs]`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, sys, torch
from potpourri.core.timing import interleaved_timings, page_faults_per_call, quartiles, retain_freed_memory
torch.set_num_threads(1)
setting, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
retained = retain_freed_memory() if setting == "retain" else False
from potpourri.deploy.latency import build_candidates
models = build_candidates(names)
x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
calls = {n: (lambda m=m: m(x)) for n, m in models.items()}
with torch.inference_mode():
    faults = {n: page_faults_per_call(c, calls=3) for n, c in calls.items()}
    timings = interleaved_timings(calls, rounds=rounds, min_time_s=0.3)
rows = {}
for n, v in timings.items():
    q1, median, q3 = quartiles(v)
    rows[n] = {"median_ms": median * 1e3, "q1_ms": q1 * 1e3, "q3_ms": q3 * 1e3, "faults_per_forward": faults[n]}
print(json.dumps({"setting": setting, "retained": retained, "rows": rows}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "efficientmod_xxs"])
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    load_before = os.getloadavg()
    results = []
    for setting in ("default", "retain"):
        done = subprocess.run([sys.executable, "-c", CHILD, setting, str(args.rounds), *args.models], env=env,
                              capture_output=True, text=True, check=True)  # fmt: skip
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    reference = args.models[0]
    print("| malloc | model | median ms | IQR ms | page faults / forward | latency / " + reference + " |")
    print("|---|---|---|---|---|---|")
    for result in results:
        rows = result["rows"]
        for name, row in rows.items():
            ratio = row["median_ms"] / rows[reference]["median_ms"]
            print(
                f"| {result['setting']} | {name} | {row['median_ms']:.2f} | {row['q1_ms']:.2f}–{row['q3_ms']:.2f} | "
                f"{row['faults_per_forward']:.0f} | {ratio:.3f} |"
            )
    print(f"load average before {load_before}, after {os.getloadavg()}")


if __name__ == "__main__":
    main()
