"""CLI verbs of the data area: ``potpourri synth`` (write DS-Synth) and ``potpourri corrupt`` (ImageNet-C suite)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from potpourri.cli import flags
from potpourri.core.errors import PotpourriError
from potpourri.core.imaging import find_images


def _cmd_synth(args: argparse.Namespace) -> int:
    from potpourri.data.synth import CATEGORIES, write_ds_synth

    categories = [c.strip() for c in args.categories.split(",")] if args.categories else list(CATEGORIES)
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise PotpourriError(f"unknown DS-Synth category '{unknown[0]}'; choose from {', '.join(CATEGORIES)}")
    start = time.perf_counter()
    manifest = write_ds_synth(
        args.out,
        seed=args.seed,
        size=args.image_size,
        per_class=args.per_class,
        categories=categories,
        severity=args.severity,
        workers=args.workers,
        version=args.dataset_version,
    )
    seconds = time.perf_counter() - start
    images = sum(n for per_cat in manifest["counts"].values() for n in per_cat.values())
    print(f"DS-Synth v{manifest['generator_version']}: {images} images, {len(manifest['files'])} files")
    print(f"  {Path(args.out) / 'DS-Synth'} (Defect Spectrum layout), {Path(args.out) / 'MVTec-Synth'} (MVTec AD)")
    print(f"  {seconds:.1f} s ({images / seconds:.0f} images/s); manifest: {Path(args.out) / 'manifest.json'}")
    return 0


def _cmd_corrupt(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from potpourri.data.corruptions import CORRUPTIONS, corrupt
    from potpourri.data.layouts import read_image

    names = list(CORRUPTIONS) if args.name == "all" else [n.strip() for n in args.name.split(",")]
    for name in names:
        if name not in CORRUPTIONS:
            raise PotpourriError(f"unknown corruption '{name}'; choose from all, {', '.join(CORRUPTIONS)}")
    try:
        severities = [int(s) for s in args.severity.split(",")] if args.severity != "all" else [1, 2, 3, 4, 5]
    except ValueError:
        raise PotpourriError(f"--severity '{args.severity}' is not 1-5, a comma-separated list or 'all'") from None
    images = find_images(args.inputs)
    out = Path(args.out)
    written = 0
    for index, path in enumerate(images):
        image = read_image(path)
        for name in names:
            for severity in severities:
                corrupted = corrupt(image, name, severity, seed=int(np.uint32(args.seed * 1_000_003 + index)))
                target = out / name / str(severity) / f"{path.stem}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(corrupted).save(target)
                written += 1
    print(f"wrote {written} corrupted images to {out}/<corruption>/<severity>/")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``synth`` and ``corrupt`` to the ``potpourri`` command."""
    p = subparsers.add_parser("synth", help="write the DS-Synth defect benchmark (Defect Spectrum + MVTec AD layouts)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=flags.non_negative_int, default=0)
    flags.add_image_size(p, default=256, help="image side in pixels (default 256)", old="--size")
    p.add_argument(
        "--per-class", type=flags.positive_int, default=20, help="test images per defect class and per category"
    )
    p.add_argument("--categories", help="comma-separated subset of brick,grass,gravel,moon,tissue (default all)")
    p.add_argument(
        "--severity", type=flags.probability, default=0.5, help="defect size and contrast in [0, 1] (default 0.5)"
    )
    p.add_argument(
        "--workers", type=flags.non_negative_int, default=None, help="processes (default: all cores, at most 8)"
    )
    p.add_argument(
        "--dataset-version",
        choices=["1", "2"],
        default="1",
        help="1: the original (default); 2: defect types share one ink and differ by shape only",
    )
    p.set_defaults(func=_cmd_synth)

    p = subparsers.add_parser("corrupt", help="apply ImageNet-C corruptions (19 kinds x 5 severities) to images")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", required=True, help="output folder; files go to <out>/<corruption>/<severity>/")
    p.add_argument("--name", default="all", help="corruption name(s), comma-separated, or 'all' (default)")
    p.add_argument("--severity", default="3", help="1-5, comma-separated, or 'all' (default 3)")
    p.add_argument("--seed", type=flags.non_negative_int, default=0)
    p.set_defaults(func=_cmd_corrupt)
