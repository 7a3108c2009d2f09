"""The ``potpourri`` command: a thin shell over the Python API (argparse only, one file per verb group).

Every module in ``GROUPS`` defines ``register(subparsers)``, which adds its verbs and sets ``func`` on each; the
work itself lives in the task folders below. A ``PotpourriError`` becomes one line on stderr and exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from potpourri.cli import app, data, deploy, detect, flags, inspect, models, papers, sam, tune, vlm
from potpourri.core.errors import PotpourriError
from potpourri.core.version import __version__

__all__ = ["GROUPS", "build_parser", "main"]

# verb groups in the order `potpourri --help` lists them
GROUPS = (models, papers, data, tune, inspect, deploy, vlm, detect, sam, app)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every group's verbs."""
    parser = flags.OneLineParser(prog="potpourri", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"potpourri {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for group in GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``potpourri`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("POTPOURRI_DEBUG") == "1"
    try:
        parser = build_parser()
        args = parser.parse_args(flags.with_config(parser, argv))
        flags.normalise_run(args)
        flags.check_compute(args)
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
