"""``potpourri inspect fit`` / ``predict``: fit an inspection method on a folder, then score new images.

Data for ``fit``: an MVTec-AD folder (``train/good``, ``test/<defect>``, ``ground_truth/<defect>/NNN_mask.png``)
or a plain folder of normal images, or ``ds-synth:<category>`` (generated once into the cache).
"""

from __future__ import annotations

import argparse

from potpourri.cli import flags, segment
from potpourri.inspect.base import METHOD_MODULES, method_module

__all__ = [
    "register",
]


def _cmd_fit(args: argparse.Namespace) -> int:
    from potpourri.inspect.pipeline import fit_folder

    fit_folder(
        data_spec=args.data,
        method_name=args.method,
        out=args.out,
        pixel_threshold=args.pixel_threshold,
        seed=args.seed,
        threads=args.threads,
        threshold=args.threshold,
        val_fraction=args.val_fraction,
        config=method_module(args.method).config_from_args(args),
        device=args.device,
        precision=args.precision,
        false_alarm_rate=args.false_alarm_rate,
        normal_holdout=args.normal_holdout,
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from potpourri.inspect.pipeline import predict_images

    predict_images(
        run_dir=args.run,
        images=args.images,
        out=args.out,
        threads=args.threads,
        device=args.device,
        precision=args.precision,
        resume=args.resume,
        top_k=args.top_k,
        max_overlays=args.max_overlays,
        progress=not args.no_progress,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``inspect fit`` and ``inspect predict`` to the ``potpourri`` command."""
    parser = subparsers.add_parser(
        "inspect", help="defect inspection: PatchCore, AnomalyCLIP, WinCLIP, segmentation, one-shot"
    )
    verbs = parser.add_subparsers(dest="inspect_verb", metavar="VERB")
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)

    fit = verbs.add_parser("fit", help="fit a method on normal images; calibrate and evaluate on test/ if present")
    fit.add_argument("--method", choices=sorted(METHOD_MODULES), default="patchcore")
    fit.add_argument("--data", required=True, help="MVTec-AD category folder, folder of normal images, ds-synth:CAT")
    fit.add_argument("--out", help="run folder (default runs/inspect/vN)")
    fit.add_argument("--image-size", type=flags.image_side, default=224)
    fit.add_argument(
        "--backbone", default="efficientnet_lite0", help="patchcore: a registered or timm model (timm/wide_resnet50_2)"
    )
    fit.add_argument(
        "--layers", type=flags.index_list, default=None, help="patchcore: taps, e.g. 2,4 (default: by backbone)"
    )
    fit.add_argument(
        "--pretrained", action=argparse.BooleanOptionalAction, default=True, help="patchcore: pretrained backbone"
    )
    fit.add_argument(
        "--tile", action="store_true", help="patchcore: large images as overlapping --image-size tiles (not shrunk)"
    )
    fit.add_argument("--coreset-ratio", type=flags.fraction, default=0.1)
    fit.add_argument(
        "--k-shot", type=flags.positive_int, default=None, help="few-shot: use only K seeded normal images"
    )
    fit.add_argument("--nn-backend", choices=("torch", "faiss"), default="torch", help="faiss needs faiss-cpu")
    from potpourri.inspect.patchcore import PatchCoreConfig

    cfg = PatchCoreConfig()  # its defaults are the flags' defaults
    fit.add_argument("--embed-dim", type=flags.positive_int, default=cfg.embed_dim,
                     help=f"patchcore: channels after pooling the tapped layers (default {cfg.embed_dim})")  # fmt: skip
    fit.add_argument("--projection-dim", type=flags.non_negative_int, default=cfg.projection_dim,
                     help=f"patchcore: random projection for coreset distances, 0 = exact (default "
                          f"{cfg.projection_dim})")  # fmt: skip
    fit.add_argument("--num-neighbors", type=flags.positive_int, default=cfg.num_neighbors,
                     help=f"patchcore: image-score reweighting neighbours, 1 = max patch distance (default "
                          f"{cfg.num_neighbors})")  # fmt: skip
    fit.add_argument("--sigma", type=flags.non_negative_float, default=cfg.sigma,
                     help=f"patchcore: map smoothing, input pixels (default {cfg.sigma:g})")  # fmt: skip
    fit.add_argument("--map-upsample", choices=("bilinear", "nearest"), default=cfg.map_upsample,
                     help="patchcore: patch grid to input size (anomalib: nearest)")  # fmt: skip
    fit.add_argument("--bank-dtype", choices=("float16", "float32"), default=cfg.bank_dtype,
                     help="patchcore: stored coreset precision")  # fmt: skip
    fit.add_argument("--coreset-max-patches", type=flags.non_negative_int, default=cfg.coreset_max_patches,
                     help=f"patchcore: greedy selection per slice of this many patches, 0 = one pass (default "
                          f"{cfg.coreset_max_patches:,})")  # fmt: skip
    fit.add_argument("--threshold", type=float, default=None, help="image threshold (default: F1-max on validation)")
    fit.add_argument("--pixel-threshold", type=float, default=None)
    fit.add_argument(
        "--false-alarm-rate", type=flags.fraction, default=0.01,
        help="without labelled defects: threshold at this share of held-out good images (default 0.01)",
    )  # fmt: skip
    fit.add_argument(
        "--normal-holdout", type=flags.fraction, default=0.2,
        help="without labelled defects: share of the good training images held out to calibrate on (default 0.2)",
    )  # fmt: skip
    fit.add_argument(
        "--val-fraction", type=flags.fraction, default=0.5, help="share of test/ used to calibrate thresholds"
    )
    fit.add_argument("--seed", type=flags.non_negative_int, default=0)
    fit.add_argument("--threads", type=flags.non_negative_int, default=None)
    flags.add_compute(fit)
    zero_shot = fit.add_argument_group("anomalyclip / winclip (zero-shot on --data, trained on --aux-data)")
    zero_shot.add_argument("--aux-data", help="labelled auxiliary sets, e.g. ds-synth:brick,gravel or DIR1,DIR2")
    zero_shot.add_argument(
        "--clip",
        help="open_clip architecture (e.g. ViT-B-16) or JSON config, or clip_vit_tiny_minilm: our ViT + MiniLM trained "
        "on DS-Synth brick/grass/gravel + clutter (zero-shot only on moon/tissue); default: the Lite0 stand-in",
    )
    zero_shot.add_argument(
        "--clip-weights", type=flags.existing_path,
        help="local open_clip checkpoint for --clip (never downloaded), or the `reproduce clip-small` model folder",
    )  # fmt: skip
    zero_shot.add_argument(
        "--epochs", type=flags.positive_int, default=None, help="prompt/bridge training epochs (default 15)"
    )
    zero_shot.add_argument("--object-name", default=None, help="winclip: the noun in the prompts (default object)")
    fit.set_defaults(func=_cmd_fit)

    predict = verbs.add_parser("predict", help="score images with a fitted run: CSV, overlays, masks, report.html")
    flags.add_run(predict, "written by `potpourri inspect fit`")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    predict.add_argument("--out", help="output folder (default RUN/predict/vN)")
    predict.add_argument("--threads", type=flags.non_negative_int, default=None)
    predict.add_argument("--resume", action="store_true", help="continue a killed predict in --out (same CSV)")
    predict.add_argument("--top-k", type=flags.non_negative_int, default=16, help="overlays for the top-K scores")
    predict.add_argument(
        "--max-overlays", type=flags.non_negative_int, default=100, help="overlays for at most N flagged images"
    )
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    flags.add_compute(predict)
    predict.set_defaults(func=_cmd_predict)
    segment.register_verbs(verbs)
