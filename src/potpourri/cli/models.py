"""``potpourri list`` / ``info`` / ``fetch`` / ``predict``: the model registry and pretrained classifiers."""

from __future__ import annotations

import argparse
import json
import os

from potpourri.cli import flags
from potpourri.core.errors import PotpourriError


def _cmd_list(args: argparse.Namespace) -> int:
    from potpourri.core.registry import REGISTRY, list_models

    names = list_models(args.pattern or "", pretrained=args.pretrained)
    if not names:
        raise PotpourriError(f"no model matches '{args.pattern}'")
    width = max(len(n) for n in names)
    for name in names:
        entry = REGISTRY[name]
        flag = "pretrained" if entry.has_pretrained else "-"
        print(f"{name:<{width}}  {entry.modality:<9}  {flag:<10}  {entry.module}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from potpourri.core.registry import model_info

    info = model_info(args.name)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key.endswith("params"):
            value = f"{value:,} ({value / 1e6:.2f} M)"
        print(f"{key:<17} {value}")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from potpourri.core.registry import get_entry
    from potpourri.core.weights import resolve_weights

    for name in args.names:
        entry = get_entry(name)
        if entry.pretrained_cfg is None:
            raise PotpourriError(f"model '{name}' has no pretrained weights to fetch")
        path = resolve_weights(entry.pretrained_cfg, cache_dir=args.cache_dir, refresh=True)
        entry.fn(pretrained=True)  # prove the weights load into the model
        print(f"{name}: {path}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    images = ([args.model] if args.model else []) + args.images if args.run else args.images
    if not args.run and args.model is None:
        raise PotpourriError("give a model name (`potpourri list`) or --run RUN (a `potpourri tune` folder)")
    if args.run:
        from potpourri.deploy.runs import run_kind

        kind = run_kind(args.run)
        if kind != "classifier":
            return _predict_other_run(kind, args, images)
    from potpourri.tune.predict import predict_images

    run = predict_images(
        None if args.run else args.model,
        images,
        topk=args.topk,
        weights=args.weights,
        run=args.run,
        out=args.out,
        device=args.device,
        precision=args.precision,
    )
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 wrote the run and prints it
        return 0
    for row in run.read_summary()["predictions"]:
        top = ", ".join(f"{p['label']} ({p['prob']:.3f})" for p in row["top"])
        print(f"{row['image']}: {top}")
    print(f"report: {run.path / 'report.html'}")
    return 0


def _predict_other_run(kind: str, args: argparse.Namespace, images: list[str]) -> int:
    """``predict --run`` of an inspection, segmenter or detector run: that kind's own predict verb, defaults kept."""
    if args.weights is not None:
        raise PotpourriError("--weights does not apply with --run: the run's own weights are used")
    compute = {"device": args.device, "precision": args.precision, "out": args.out, "threads": None}
    if kind == "inspection":
        from potpourri.inspect.pipeline import predict_images as inspect_images

        inspect_images(run_dir=args.run, images=images, **compute)
    elif kind == "segmenter":
        from potpourri.segment.pipeline import predict_segmenter_run

        predict_segmenter_run(run_dir=args.run, image_paths=images, **compute)
    else:
        from potpourri.detect.pipeline import predict_run

        predict_run(run_dir=args.run, images=images, conf=0.25, iou=0.6, no_reparam=False, **compute)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``potpourri list``, ``info``, ``fetch`` and ``predict``."""
    sub = subparsers
    p = sub.add_parser("list", help="list registered models")
    p.add_argument("pattern", nargs="?", help="fnmatch pattern or substring, e.g. 'efficient*'")
    p.add_argument("--pretrained", action="store_true", help="only models with pretrained weights")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="parameters, input size, weights source, license and paper of a model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("fetch", help="make pretrained weights available offline (convert and cache)")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--cache-dir", help="cache folder (default $POTPOURRI_CACHE or ~/.cache/potpourri)")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("predict", help="classify images with a pretrained model or a tuned run (--run)")
    p.add_argument("model", nargs="?", help="a registered or timm model; omit with --run")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument(
        "--run",
        type=flags.existing_path,
        help="a run folder (tune: its classes, weights and transform; inspect fit, segment-train, detect train)",
    )
    p.add_argument("--topk", type=flags.positive_int, default=5)
    p.add_argument(
        "--weights", type=flags.existing_path, help="explicit weight file (safetensors or weights-only torch file)"
    )
    p.add_argument("--out", help="run folder (default runs/predict/vN)")
    flags.add_compute(p)
    p.set_defaults(func=_cmd_predict)
