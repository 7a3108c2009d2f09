"""The one flag vocabulary of every verb: ``--data --out --run --image-size --batch-size --epochs/--steps --lr --seed
--threads``. Old spellings stay as hidden aliases for one release (help=SUPPRESS).
"""

from __future__ import annotations

import argparse

from potpourri.core.errors import PotpourriError

__all__ = ["add_image_size", "add_run", "normalise_run"]


def add_run(parser: argparse.ArgumentParser, what: str) -> None:
    """``--run RUN``: an existing run folder (``what`` says which verb wrote it); ``RUN`` as the first positional is
    the old spelling and still works."""
    parser.add_argument("--run", help=f"an existing run folder ({what})")
    parser.add_argument("legacy_run", nargs="?", metavar="RUN", help=argparse.SUPPRESS)


def add_image_size(parser: argparse.ArgumentParser, *, default: int | None, help: str, old: str | None = None) -> None:
    """``--image-size N`` (square input side); ``old`` is a former spelling kept as a hidden alias."""
    parser.add_argument("--image-size", dest="image_size", type=int, default=default, help=help)
    if old:
        parser.add_argument(old, dest="image_size", type=int, default=default, help=argparse.SUPPRESS)


def normalise_run(args: argparse.Namespace) -> None:
    """Resolve ``--run`` against the old positional spelling; with ``--run``, a leading positional is an image."""
    if not hasattr(args, "legacy_run"):
        return
    legacy = args.__dict__.pop("legacy_run")
    images = getattr(args, "images", None)
    if args.run is None:
        if legacy is None:
            raise PotpourriError("give the run folder: --run RUN")
        args.run = legacy
    elif legacy is not None:
        if images is None:
            raise PotpourriError(f"unexpected argument '{legacy}': the run folder is already given by --run")
        images.insert(0, legacy)
