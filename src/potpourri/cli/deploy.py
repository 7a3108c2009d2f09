"""Deployment verbs: ``potpourri export`` (ONNX + parity + metadata.json) and ``potpourri bench`` (latency)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from potpourri.cli import flags
from potpourri.core.errors import PotpourriError


def _cmd_export(args: argparse.Namespace) -> int:
    from potpourri.core.registry import create_model, get_pretrained_cfg
    from potpourri.core.runs import new_run
    from potpourri.deploy.export import export_onnx, result_dict
    from potpourri.tune.predict import class_names

    if args.format != "onnx":
        raise PotpourriError(f"unknown export format '{args.format}'; choose onnx")
    cfg = get_pretrained_cfg(args.model)
    model = create_model(args.model, pretrained=args.pretrained, weights=args.weights)
    size = args.image_size or (cfg.input_size[-1] if cfg else 224)
    run = new_run("export", args.out, config=vars(args) | {"func": None})
    names = class_names(cfg.label_set, model.num_classes) if cfg and getattr(model, "num_classes", 0) else None
    result = export_onnx(
        model, run.path, input_size=(3, size, size), cfg=cfg, class_names=names, reparam=args.reparam, name=args.model
    )
    run.write_summary(result_dict(result))
    print(f"{result.onnx_path} (ONNX Runtime max |diff| {result.max_abs_diff:.2e}); metadata: {result.metadata_path}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from potpourri.core.runs import new_run
    from potpourri.deploy.latency import bench_models, latency_table
    from potpourri.report.html import Report

    rows, conditions = bench_models(
        args.models,
        batches=args.batch,
        threads=args.threads,
        backends=args.backend,
        image_size=args.image_size,
        rounds=args.rounds,
        reparam=args.reparam,
    )
    run = new_run("bench", args.out, config=vars(args) | {"func": None})
    for row in rows:
        run.log_metrics(asdict(row))
    table = latency_table(rows, reference=args.models[0])
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


def _cmd_auto_replace(args: argparse.Namespace) -> int:
    import torch

    from potpourri.core.registry import create_model
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.data.synth import make_task
    from potpourri.deploy.auto_replace import auto_replace, mlp_to_conv
    from potpourri.report.html import Report

    seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    model = create_model(args.model, pretrained=args.pretrained, weights=args.weights, img_size=args.image_size)
    task = make_task("classification", n_per_class=max(1, args.images // 21 + 1), size=args.image_size, seed=args.seed)
    images = (torch.from_numpy(task.train_images).permute(0, 3, 1, 2).float() / 127.5 - 1.0)[: args.images]
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))]
    run = new_run("auto-replace", args.out, config=vars(args) | {"func": None}, seed=args.seed)
    _, exact_diff = mlp_to_conv(model, images[:2])
    plan = auto_replace(
        model,
        images,
        budget_ms=args.budget_ms,
        speedup=args.speedup,
        steps=args.steps,
        rounds=args.rounds,
        seed=args.seed,
        global_steps=args.global_steps,
    )
    for row in plan.rows:
        run.log_metrics(row)
    summary = {
        "teacher_ms": plan.teacher_ms,
        "student_ms": plan.student_ms,
        "speedup": plan.teacher_ms / plan.student_ms,
        "agreement": plan.agreement,
        "output_rel_error": plan.output_rel_error,
        "exact_fc_to_conv_max_abs_diff": exact_diff,
        "sites": plan.rows,
    }
    run.write_summary(summary)
    report = Report(f"potpourri auto-replace — {args.model}")
    report.section("Chosen replacements", "Local loss: held-out MSE / target variance of the site's output.")
    report.table(plan.rows)
    report.table(
        [{"model": "teacher", "batch-1 ms": plan.teacher_ms}, {"model": "student", "batch-1 ms": plan.student_ms}]
    )
    report.text(
        f"Top-1 agreement with the teacher on held-out images: {plan.agreement:.3f}; relative output error "
        f"{plan.output_rel_error:.3f}. Exact FC→1×1-conv "
        f"rewrite of every MLP: max |diff| {exact_diff:.2e}."
    )
    report.write(run.path / "report.html")
    for row in plan.rows:
        print(f"{row['site']:<16} {row['chosen']:<18} loss {row['local_loss']:.3f}  saved {row['saved_ms']:.2f} ms")
    print(
        f"batch-1 latency {plan.teacher_ms:.2f} → {plan.student_ms:.2f} ms "
        f"({plan.teacher_ms / plan.student_ms:.2f}x), agreement {plan.agreement:.3f}, "
        f"relative output error {plan.output_rel_error:.3f}; run: {run.path}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``bench``."""
    p = subparsers.add_parser("export", help="export a model to ONNX with a parity check and metadata.json")
    p.add_argument("model")
    p.add_argument("--format", default="onnx", help="only onnx for now")
    p.add_argument("--reparam", action="store_true", help="re-parameterise (fuse branches) before exporting")
    p.add_argument("--pretrained", action="store_true", help="export with pretrained weights")
    p.add_argument("--weights", help="explicit weight file")
    flags.add_image_size(p, default=None, help="input size (default: the model's)", old="--size")
    p.add_argument("--out", help="output folder (default runs/export/vN)")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser("bench", help="latency of models side by side (interleaved, threads pinned)")
    p.add_argument("models", nargs="+", metavar="MODEL", help="the first one is the reference for speed-ups")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", nargs="+", default=["eager"], help="eager and/or onnxruntime")
    flags.add_image_size(p, default=224, help="input size (default 224)", old="--size")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--reparam", action="store_true", help="also time each model re-parameterised")
    p.add_argument("--out", help="run folder (default runs/bench/vN)")
    p.set_defaults(func=_cmd_bench)

    p = subparsers.add_parser("auto-replace", help="replace ViT sub-blocks by cheaper distilled ones under a budget")
    p.add_argument("model", help="a ViT-like model, e.g. deit_tiny_patch16_224")
    p.add_argument("--budget-ms", type=float, help="latency budget for the replaced sites at batch 1")
    p.add_argument("--speedup", type=float, default=1.5, help="without --budget-ms: sites' latency / this")
    p.add_argument("--steps", type=int, default=100, help="local distillation steps per candidate")
    p.add_argument("--images", type=int, default=64, help="images whose activations are cached")
    p.add_argument("--global-steps", type=int, default=0, help="then fine-tune the new modules against the teacher")
    flags.add_image_size(p, default=224, help="input size (default 224)", old="--size")
    p.add_argument("--rounds", type=int, default=5, help="latency rounds per candidate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--weights", help="explicit weight file for the teacher")
    p.add_argument("--out", help="run folder (default runs/auto-replace/vN)")
    p.set_defaults(func=_cmd_auto_replace)
