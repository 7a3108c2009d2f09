"""Deployment verbs: ``potpourri export`` (ONNX + parity + metadata.json) and ``potpourri bench`` (latency)."""

from __future__ import annotations

import argparse

from potpourri.cli import flags
from potpourri.core.errors import PotpourriError
from potpourri.deploy.latency import ALLOCATORS, BACKENDS


def _cmd_export(args: argparse.Namespace) -> int:
    from potpourri.deploy.pipeline import export_run

    if (args.model is None) == (args.run is None):
        raise PotpourriError("give a model name or --run RUN (a `potpourri tune` folder), not both")
    export_run(
        export_format=args.format,
        run=args.run,
        image_size=args.image_size,
        model_name=args.model,
        out=args.out,
        pretrained=args.pretrained,
        reparam=args.reparam,
        weights=args.weights,
        run_config=vars(args) | {"func": None},
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from potpourri.deploy.pipeline import bench_run

    bench_run(
        backend=args.backend,
        batch=args.batch,
        image_size=args.image_size,
        models=args.models,
        out=args.out,
        reparam=args.reparam,
        rounds=args.rounds,
        threads=args.threads,
        run_config=vars(args) | {"func": None},
        roofline=args.roofline or bool(args.per_layer),
        per_layer=args.per_layer,
        allocator=args.allocator,
    )
    return 0


def _cmd_auto_replace(args: argparse.Namespace) -> int:
    from potpourri.deploy.pipeline import auto_replace_run

    auto_replace_run(
        budget_ms=args.budget_ms,
        global_steps=args.global_steps,
        image_size=args.image_size,
        n_images=args.images,
        model_name=args.model,
        out=args.out,
        pretrained=args.pretrained,
        rounds=args.rounds,
        seed=args.seed,
        speedup=args.speedup,
        steps=args.steps,
        threads=args.threads,
        weights=args.weights,
        run_config=vars(args) | {"func": None},
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` and ``bench``."""
    p = subparsers.add_parser("export", help="export a model or a tuned run to ONNX with a parity check and metadata")
    p.add_argument("model", nargs="?", help="a registered or timm model; omit with --run")
    p.add_argument("--run", type=flags.existing_path, help="a `potpourri tune` run folder (its classes and weights)")
    p.add_argument("--format", default="onnx", help="only onnx for now")
    p.add_argument("--reparam", action="store_true", help="re-parameterise (fuse branches) before exporting")
    p.add_argument("--pretrained", action="store_true", help="export with pretrained weights")
    p.add_argument("--weights", type=flags.existing_path, help="explicit weight file")
    flags.add_image_size(p, default=None, help="input size (default: the model's)", old="--size")
    p.add_argument("--out", help="output folder (default runs/export/vN)")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser("bench", help="latency of models side by side (interleaved, threads pinned)")
    p.add_argument(
        "models", nargs="+", type=flags.model_name, metavar="MODEL", help="the first one is the reference for speed-ups"
    )
    p.add_argument("--batch", type=flags.positive_int, nargs="+", default=[1])
    p.add_argument("--threads", type=flags.positive_int, default=1)
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=["eager"], help=", ".join(BACKENDS))
    p.add_argument(
        "--roofline",
        action="store_true",
        help="measure this machine's matmul peak and memory bandwidth; report each model's bound and achieved share",
    )
    p.add_argument(
        "--per-layer",
        type=flags.positive_int,
        nargs="?",
        const=10,
        default=0,
        metavar="N",
        help="with --roofline: the top N layers (default 10) of each model under 60%% of its bound",
    )
    flags.add_image_size(p, default=224, help="input size (default 224)", old="--size")
    p.add_argument("--rounds", type=flags.positive_int, default=10)
    p.add_argument("--reparam", action="store_true", help="also time each model re-parameterised")
    p.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="retain",
        help="retain (default): glibc keeps freed memory, so megabyte activations are not page-faulted in again on "
        "every call (the faults/call column shows it); default: malloc as it is",
    )
    p.add_argument("--out", help="run folder (default runs/bench/vN)")
    p.set_defaults(func=_cmd_bench)

    p = subparsers.add_parser("auto-replace", help="replace ViT sub-blocks by cheaper distilled ones under a budget")
    p.add_argument("model", help="a ViT-like model, e.g. deit_tiny_patch16_224")
    p.add_argument("--budget-ms", type=flags.positive_float, help="latency budget for the replaced sites at batch 1")
    p.add_argument(
        "--speedup", type=flags.positive_float, default=1.5, help="without --budget-ms: sites' latency / this"
    )
    p.add_argument("--steps", type=flags.positive_int, default=100, help="local distillation steps per candidate")
    p.add_argument("--images", type=flags.positive_int, default=64, help="images whose activations are cached")
    p.add_argument(
        "--global-steps",
        type=flags.non_negative_int,
        default=0,
        help="then fine-tune the new modules against the teacher",
    )
    flags.add_image_size(p, default=224, help="input size (default 224)", old="--size")
    p.add_argument("--rounds", type=flags.positive_int, default=5, help="latency rounds per candidate")
    p.add_argument("--threads", type=flags.non_negative_int, default=1)
    p.add_argument("--seed", type=flags.non_negative_int, default=0)
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--weights", type=flags.existing_path, help="explicit weight file for the teacher")
    p.add_argument("--out", help="run folder (default runs/auto-replace/vN)")
    p.set_defaults(func=_cmd_auto_replace)
