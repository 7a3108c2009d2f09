"""``potpourri inspect segment-train`` / ``segment-predict``: the multi-class defect segmenter from the command line.

Data for ``segment-train`` (``--data``):

* ``ds-synth:<category>``: DS-Synth generated in memory; train on the photo's training rows, test on its held-out
  rows.
* a Defect Spectrum category folder: ``image/<defect>/NNN.png`` with ``mask/<defect>/NNN_mask.png`` (class ids)
  or ``rbg_mask|rgb_mask/<defect>/NNN_rbg_mask.png`` (palette colours); class names from ``classes.json``.
* a folder with ``images/`` and ``masks/``: class-id PNG masks named ``<stem>.png`` or ``<stem>_mask.png``.

Folders are split into train and test images (``--test-fraction``, seeded).
"""

from __future__ import annotations

import argparse

from potpourri.cli import flags

__all__ = [
    "register_verbs",
]


def _cmd_train(args: argparse.Namespace) -> int:
    from potpourri.segment.pipeline import train_segmenter_run

    train_segmenter_run(
        batch_size=args.batch_size,
        data_spec=args.data,
        dice_weight=args.dice_weight,
        encoder=args.encoder,
        encoder_lr=args.encoder_lr,
        epochs=args.epochs,
        image_size=args.image_size,
        lr=args.lr,
        out=args.out,
        per_kind=args.per_kind,
        seed=args.seed,
        steps=args.steps,
        test_fraction=args.test_fraction,
        threads=args.threads,
        tune_blocks=args.tune_blocks,
        device=args.device,
        precision=args.precision,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        sync_bn=args.sync_bn,
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from potpourri.segment.pipeline import predict_segmenter_run

    predict_segmenter_run(
        image_paths=args.images,
        out=args.out,
        run_dir=args.run,
        threads=args.threads,
        device=args.device,
        precision=args.precision,
    )
    return 0


def _register_segmenter(verbs: argparse._SubParsersAction) -> None:
    """Add ``segment-train`` and ``segment-predict`` to ``potpourri inspect``."""
    from potpourri.segment.segmenter import ENCODER_POLICIES

    train = verbs.add_parser("segment-train", help="train the multi-class defect segmenter; test mIoU, report.html")
    train.add_argument("--data", required=True, help="ds-synth:CATEGORY, a Defect Spectrum category folder or DIR")
    train.add_argument("--out", help="run folder (default runs/segment/vN)")
    train.add_argument("--encoder", choices=ENCODER_POLICIES, default="frozen")
    train.add_argument("--tune-blocks", nargs="+", help="partial: encoder blocks that train, e.g. blocks.4.0")
    train.add_argument(
        "--epochs", type=flags.positive_float, default=None, help="passes over the training set (overrides --steps)"
    )
    train.add_argument("--steps", type=flags.positive_int, default=400, help="AdamW steps")
    train.add_argument("--image-size", type=flags.image_side, default=96)
    train.add_argument("--batch-size", type=flags.positive_int, default=8)
    train.add_argument("--lr", type=flags.positive_float, default=2e-3, help="decoder learning rate")
    train.add_argument("--encoder-lr", type=flags.positive_float, default=2e-4)
    train.add_argument("--dice-weight", type=flags.non_negative_float, default=0.5)
    train.add_argument(
        "--per-kind", type=flags.positive_int, default=10, help="ds-synth: training images per defect kind"
    )
    train.add_argument("--test-fraction", type=flags.fraction, default=0.2, help="folders: share of images held out")
    train.add_argument("--seed", type=flags.non_negative_int, default=0)
    train.add_argument("--threads", type=flags.non_negative_int, default=None)
    flags.add_compute(train)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument(
        "--checkpoint-every", type=flags.non_negative_int, default=100, help="steps between checkpoints (0: at the end)"
    )
    flags.add_sync_bn(train)
    train.set_defaults(func=_cmd_train)

    predict = verbs.add_parser("segment-predict", help="segment images with a trained run: class-id masks, report")
    flags.add_run(predict, "written by `potpourri inspect segment-train`")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    predict.add_argument("--out", help="output folder (default RUN/predict/vN)")
    predict.add_argument("--threads", type=flags.non_negative_int, default=None)
    flags.add_compute(predict)
    predict.set_defaults(func=_cmd_predict)


def _cmd_oneshot(args: argparse.Namespace) -> int:
    from potpourri.segment.pipeline import oneshot_run

    oneshot_run(
        image_size=args.image_size,
        images=args.images,
        load=args.load,
        method=args.method,
        out=args.out,
        sd_weights=args.sd_weights,
        seed=args.seed,
        steps=args.steps,
        support_images=args.support,
        support_mask=args.support_mask,
        threads=args.threads,
        truth_masks=args.truth,
        device=args.device,
        precision=args.precision,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
    )
    return 0


def _register_oneshot(verbs: argparse._SubParsersAction) -> None:
    """Add ``potpourri inspect oneshot``: fit from annotated support images (or --load), segment IMAGES."""
    from potpourri.segment.oneshot import METHODS

    p = verbs.add_parser("oneshot", help="SLiMe-style one-shot segmentation from one (or k) annotated images")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="images (or folders) to segment")
    p.add_argument("--support", action="append", help="an annotated image (repeat for k-shot)")
    p.add_argument("--support-mask", action="append", help="its class-index PNG mask, 0 = background (repeat)")
    p.add_argument("--truth", action="append", help="optional class-index mask of each IMAGE, in order (for IoU)")
    p.add_argument("--method", choices=METHODS, default="slime")
    p.add_argument("--load", help="a model folder saved by an earlier run (RUN/model) instead of --support")
    p.add_argument("--sd-weights", help="Stable Diffusion 2.1-base folder (diffusers format); default: Lite0 features")
    p.add_argument("--image-size", type=flags.image_side, default=256)
    p.add_argument("--steps", type=flags.positive_int, default=200)
    p.add_argument("--out", help="run folder (default runs/oneshot/vN)")
    p.add_argument("--seed", type=flags.non_negative_int, default=0)
    p.add_argument("--threads", type=flags.non_negative_int, default=None)
    flags.add_compute(p)
    p.add_argument("--resume", action="store_true", help="continue the fit in --out from its last checkpoint")
    p.add_argument(
        "--checkpoint-every", type=flags.non_negative_int, default=50, help="fit steps between checkpoints in --out"
    )
    p.set_defaults(func=_cmd_oneshot)


def register_verbs(verbs: argparse._SubParsersAction) -> None:
    """Add the segmentation verbs (``oneshot``, ``segment-train``, ``segment-predict``) to ``potpourri inspect``."""
    _register_oneshot(verbs)
    _register_segmenter(verbs)
