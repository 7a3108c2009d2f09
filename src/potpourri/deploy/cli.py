"""Deployment verbs: ``potpourri export`` (ONNX + parity + metadata.json) and ``potpourri bench`` (latency)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from potpourri.errors import PotpourriError


def _cmd_export(args: argparse.Namespace) -> int:
    from potpourri.deploy.export import export_onnx, result_dict
    from potpourri.predict import class_names
    from potpourri.registry import create_model, get_pretrained_cfg
    from potpourri.runs import new_run

    if args.format != "onnx":
        raise PotpourriError(f"unknown export format '{args.format}'; choose onnx")
    cfg = get_pretrained_cfg(args.model)
    model = create_model(args.model, pretrained=args.pretrained, weights=args.weights)
    size = args.size or (cfg.input_size[-1] if cfg else 224)
    run = new_run("export", args.out)
    run.write_config(vars(args) | {"func": None})
    run.write_env()
    names = class_names(cfg.label_set, model.num_classes) if cfg and getattr(model, "num_classes", 0) else None
    result = export_onnx(
        model, run.path, input_size=(3, size, size), cfg=cfg, class_names=names, reparam=args.reparam, name=args.model
    )
    run.write_summary(result_dict(result))
    print(f"{result.onnx_path} (ONNX Runtime max |diff| {result.max_abs_diff:.2e}); metadata: {result.metadata_path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from potpourri.deploy.latency import bench_models, markdown_table
    from potpourri.report.html import Report
    from potpourri.runs import new_run

    rows, conditions = bench_models(
        args.models,
        batches=args.batch,
        threads=args.threads,
        backends=args.backend,
        image_size=args.size,
        rounds=args.rounds,
        reparam=args.reparam,
    )
    run = new_run("bench", args.out)
    run.write_config(vars(args) | {"func": None})
    run.write_env()
    for row in rows:
        run.log_metrics(asdict(row))
    table = markdown_table(rows, reference=args.models[0])
    (run.path / "results.md").write_text(table + "\n")
    run.write_summary({"rows": [asdict(r) for r in rows], "conditions": conditions})
    report = Report("potpourri bench")
    report.section("Latency", f"Speed-up column: against {args.models[0]} with the same backend and batch.")
    report.table([asdict(r) for r in rows])
    report.text(f"Conditions: {conditions}", note=True)
    report.write(run.path / "report.html")
    print(table)
    print(f"load average before/after: {conditions['loadavg_before'][0]:.2f}/{conditions['loadavg_after'][0]:.2f}")
    print(f"run: {run.path}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``bench``."""
    p = subparsers.add_parser("export", help="export a model to ONNX with a parity check and metadata.json")
    p.add_argument("model")
    p.add_argument("--format", default="onnx", help="only onnx for now")
    p.add_argument("--reparam", action="store_true", help="re-parameterise (fuse branches) before exporting")
    p.add_argument("--pretrained", action="store_true", help="export with pretrained weights")
    p.add_argument("--weights", help="explicit weight file")
    p.add_argument("--size", type=int, help="input size (default: the model's)")
    p.add_argument("--out", help="output folder (default runs/export/vN)")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser("bench", help="latency of models side by side (interleaved, threads pinned)")
    p.add_argument("models", nargs="+", metavar="MODEL", help="the first one is the reference for speed-ups")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", nargs="+", default=["eager"], help="eager and/or onnxruntime")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--reparam", action="store_true", help="also time each model re-parameterised")
    p.add_argument("--out", help="run folder (default runs/bench/vN)")
    p.set_defaults(func=_cmd_bench)
