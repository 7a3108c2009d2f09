"""The ``potpourri`` command: a thin shell over the Python API.

Verbs of the foundation live here; each area adds its own verbs from a module that defines
``register_cli(subparsers)`` (listed in ``_VERB_MODULES``). A ``PotpourriError`` becomes one line on stderr and
exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from potpourri.errors import PotpourriError

# Modules that add verbs (``register_cli(subparsers)``); a module that does not exist yet is skipped.
_VERB_MODULES = (
    "potpourri.data.cli",
    "potpourri.tune.cli",
    "potpourri.inspect.cli",
    "potpourri.deploy.cli",
    "potpourri.experiments",
    "potpourri.models.vlm_cli",
    "potpourri.models.detect_cli",
    "potpourri.inspect.sam_cli",
    "potpourri.app.chat",
    "potpourri.app.serve",
)


def _cmd_list(args: argparse.Namespace) -> int:
    from potpourri.registry import _REGISTRY, list_models

    names = list_models(args.pattern or "", pretrained=args.pretrained)
    if not names:
        raise PotpourriError(f"no model matches '{args.pattern}'")
    width = max(len(n) for n in names)
    for name in names:
        entry = _REGISTRY[name]
        flag = "pretrained" if entry.has_pretrained else "-"
        print(f"{name:<{width}}  {entry.modality:<9}  {flag:<10}  {entry.module}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from potpourri.registry import model_info

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
    from potpourri.registry import _get_entry
    from potpourri.weights import resolve_weights

    for name in args.names:
        entry = _get_entry(name)
        if entry.pretrained_cfg is None:
            raise PotpourriError(f"model '{name}' has no pretrained weights to fetch")
        path = resolve_weights(entry.pretrained_cfg, cache_dir=args.cache_dir, refresh=True)
        entry.fn(pretrained=True)  # prove the weights load into the model
        print(f"{name}: {path}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from potpourri.predict import predict_images

    run = predict_images(args.model, args.images, topk=args.topk, weights=args.weights, out=args.out)
    for row in run.read_summary()["predictions"]:
        top = ", ".join(f"{p['label']} ({p['prob']:.3f})" for p in row["top"])
        print(f"{row['image']}: {top}")
    print(f"report: {run.path / 'report.html'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from potpourri.demo import run_demo

    run = run_demo(out=args.out, seed=args.seed, threads=args.threads)
    print(f"report: {run.path / 'report.html'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every area's verbs."""
    from potpourri import __version__

    parser = argparse.ArgumentParser(prog="potpourri", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"potpourri {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

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

    p = sub.add_parser("predict", help="classify images with a pretrained model")
    p.add_argument("model")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--weights", help="explicit weight file (safetensors or weights-only torch file)")
    p.add_argument("--out", help="run folder (default runs/predict/vN)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("demo", help="offline end-to-end demo: data, features, probe, report.html")
    p.add_argument("--out", help="run folder (default runs/demo/vN)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.set_defaults(func=_cmd_demo)

    for module_name in _VERB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``potpourri`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("POTPOURRI_DEBUG") == "1"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except PotpourriError as exc:
        if debug:
            raise
        print(f"potpourri: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("potpourri: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:
        if debug:
            raise
        where = f" '{exc.filename}'" if isinstance(exc, OSError) and exc.filename else ""
        print(f"potpourri: error:{where} {exc.strerror if isinstance(exc, OSError) else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
