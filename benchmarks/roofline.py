"""The roofline and backends table of issue 22: every registered efficient model (plus DeiT-Tiny and
EfficientNet-Lite0) through eager / ONNX Runtime / OpenVINO f32 / OpenVINO bf16 in one interleaved run, each
against this machine's roofline bound (potpourri.deploy.roofline).

Threads pinned (torch, ORT and OpenVINO thread counts, and the process's CPU affinity); machine peaks measured
before and after the latencies (the better of each is the roof); median and IQR over rounds; load average logged.
Run on a quiet machine: `.venv/bin/python benchmarks/roofline.py [--threads 1] [--batch 1] [--rounds 9]
[--per-layer 10] [--json roofline.json]`; a check that it runs: `--models repconvnet_s --size 32 --rounds 1 --quick`.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace

from potpourri.core.registry import REGISTRY
from potpourri.deploy.latency import BACKENDS, bench_models, build_candidates, latency_table
from potpourri.deploy.roofline import measure_peaks, peaks_line, roofline_report
from potpourri.models.reparam import reparameterize

PEERS = ["deit_tiny_patch16_224", "efficientnet_lite0"]


def default_models() -> list[str]:
    """DeiT-Tiny (the reference), EfficientNet-Lite0, then every registered image model tagged ``efficient``."""
    return PEERS + sorted(n for n, e in REGISTRY.items() if "efficient" in e.tags and e.modality == "image")


def pin(threads: int) -> list[int]:
    """Pin this process to the first ``threads`` CPUs it may use; returns them (empty where not supported)."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    cpus = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cpus)
    return cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="default: DeiT-Tiny, Lite0, every efficient model")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--per-layer", type=int, default=10, help="top layers of each model under 60%% of its bound")
    parser.add_argument("--quick", action="store_true", help="tiny peak sizes: checks the script, measures nothing")
    parser.add_argument("--no-affinity", action="store_true", help="do not pin the process to CPUs")
    parser.add_argument("--json", help="also write peaks, rows, per-layer tables and conditions here")
    args = parser.parse_args()

    cpus = [] if args.no_affinity else pin(args.threads)
    peak_sizes = {"sizes": (64,), "stream_mib": 4, "reps": 2, "min_time_s": 0.005} if args.quick else {}
    names = args.models or default_models()
    models = build_candidates(names)
    for name in names:  # multi-branch models also run fused
        if name in REGISTRY and "reparam" in REGISTRY[name].tags:
            models[f"{name}+reparam"] = reparameterize(models[name])

    peaks_before = measure_peaks(args.threads, **peak_sizes)
    rows, conditions = bench_models(
        list(models),
        models=models,
        batches=args.batch,
        threads=args.threads,
        backends=args.backends,
        image_size=args.size,
        rounds=args.rounds,
    )
    peaks_after = measure_peaks(args.threads, **peak_sizes)
    peaks = replace(
        peaks_before,
        matmul_gflops=max(peaks_before.matmul_gflops, peaks_after.matmul_gflops),
        bandwidth_gbs=max(peaks_before.bandwidth_gbs, peaks_after.bandwidth_gbs),
        cache_bandwidth_gbs=max(peaks_before.cache_bandwidth_gbs, peaks_after.cache_bandwidth_gbs),
    )
    report = roofline_report(
        models,
        rows,
        peaks,
        image_size=args.size,
        not_installed=conditions["not_installed"],
        per_layer_top=args.per_layer,
        rounds=args.rounds,
    )
    reference = names[0] if names[0] in models else None
    print(latency_table(rows, reference=reference))
    print()
    print(f"peaks before: {peaks_line(peaks_before)}")
    print(f"peaks after:  {peaks_line(peaks_after)}")
    print(report.text())
    conditions |= {"cpus": cpus, "batches": args.batch}
    print(f"\nconditions: {conditions}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "peaks": asdict(peaks),
                    "peaks_before": asdict(peaks_before),
                    "peaks_after": asdict(peaks_after),
                    "latency": [asdict(r) for r in rows],
                    "roofline": report.rows,
                    "per_layer": report.per_layer,
                    "conditions": conditions,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
