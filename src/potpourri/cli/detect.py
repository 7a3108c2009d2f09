"""``potpourri detect train | predict | eval``: the YOLOv6-style defect detector from the command line.

``--data`` is ``ds-synth:<category>`` (boxes from DS-Synth masks; train on the photo's training rows, test on its
held-out rows), a YOLO folder (``images/`` + ``labels/*.txt``) or a COCO json; folders are split into train and test
images with a seed (``--test-fraction``). See ``potpourri.data.boxes`` for the formats and their errors.

Example:
    potpourri detect train --data ds-synth:brick --epochs 20
    potpourri detect train --data ds-synth:brick --epochs 20 --assigner atss   # static ATSS instead of TAL
    potpourri detect train --data ds-synth:brick --neck bic --sppf simcspsppf --aat --atss-warmup-epochs 4   # v3 parts
    potpourri detect predict runs/detect/v0 photo.png --conf 0.3
    torchrun --nproc-per-node 4 -m potpourri detect predict runs/detect/v0 folder/ --out p   # files split by rank
    potpourri detect eval runs/detect/v0 --data ds-synth:brick --reparam
    potpourri detect mask-train runs/detect/v0 --data ds-synth:brick --seconds 150   # frozen detector + mask head
    potpourri detect train --data ds-synth:brick --out runs/detect/v0 --resume   # continue a killed run
    potpourri detect train --data ds-synth:brick --device cuda --precision bf16   # every verb: --device, --precision
"""

from __future__ import annotations

import argparse

from potpourri.cli import flags

__all__ = [
    "register",
]


def _cmd_train(args: argparse.Namespace) -> int:
    from potpourri.detect.pipeline import train_run

    train_run(
        assigner=args.assigner,
        atss_warmup_epochs=args.atss_warmup_epochs,
        detector_options={"neck": args.neck, "sppf": args.sppf, "aat": args.aat},
        backbone_pretrained=args.backbone_pretrained,
        batch_size=args.batch_size,
        cls_loss=args.cls_loss,
        conf=args.conf,
        data_spec=args.data,
        device=args.device,
        epochs=args.epochs,
        eval_every=args.eval_every,
        image_size=args.image_size,
        lr=args.lr,
        model_name=args.model,
        optimizer=args.optimizer,
        out=args.out,
        per_kind=args.per_kind,
        precision=args.precision,
        resume=args.resume,
        seed=args.seed,
        test_fraction=args.test_fraction,
        threads=args.threads,
        sync_bn=args.sync_bn,
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from potpourri.detect.pipeline import predict_run

    predict_run(
        conf=args.conf,
        device=args.device,
        images=args.images,
        iou=args.iou,
        no_reparam=args.no_reparam,
        out=args.out,
        precision=args.precision,
        resume=args.resume,
        run_dir=args.run,
        threads=args.threads,
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from potpourri.detect.pipeline import eval_run

    eval_run(
        data_spec=args.data,
        device=args.device,
        out=args.out,
        per_kind=args.per_kind,
        precision=args.precision,
        reparam=args.reparam,
        run_dir=args.run,
        seed=args.seed,
        split=args.split,
        test_fraction=args.test_fraction,
        threads=args.threads,
    )
    return 0


def _cmd_mask_train(args: argparse.Namespace) -> int:
    from potpourri.detect.pipeline import mask_train_run

    mask_train_run(
        data=args.data,
        device=args.device,
        lr=args.lr,
        out=args.out,
        per_kind=args.per_kind,
        precision=args.precision,
        resume=args.resume,
        run_dir=args.run,
        seconds=args.seconds,
        seed=args.seed,
        steps=args.steps,
        threads=args.threads,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``detect train``, ``predict``, ``eval`` and ``mask-train`` to the ``potpourri`` command."""
    from potpourri.models import yolo  # noqa: F401  (registers the detector variants)

    parser = subparsers.add_parser("detect", help="YOLOv6-style defect detector: train, predict, eval")
    verbs = parser.add_subparsers(dest="detect_verb", metavar="VERB")
    parser.set_defaults(func=lambda _args: parser.print_help() or 2)

    train = verbs.add_parser("train", help="train a detector; test mAP, re-parameterisation parity, report.html")
    train.add_argument("--data", required=True, help="ds-synth:CATEGORY, a YOLO folder or a COCO json")
    train.add_argument("--model", default="yolo_rep_n", choices=("yolo_rep_n", "yolo_rep_s", "yolo_lite0_pan"))
    train.add_argument("--backbone-pretrained", action="store_true", help="yolo_lite0_pan: ImageNet backbone")
    train.add_argument("--out", help="run folder (default runs/detect/vN)")
    train.add_argument("--image-size", type=flags.image_side, default=256, help="square input side, a multiple of 32")
    train.add_argument("--epochs", type=flags.positive_int, default=30)
    train.add_argument("--batch-size", type=flags.positive_int, default=16)
    train.add_argument("--lr", type=flags.positive_float, default=2e-3)
    train.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
    train.add_argument("--cls-loss", choices=("vfl", "bce"), default="vfl")
    train.add_argument(
        "--assigner", choices=("tal", "atss"), default="tal", help="label assignment: task-aligned (TAL) or ATSS"
    )
    train.add_argument(
        "--atss-warmup-epochs", type=flags.non_negative_int, default=0, help="YOLOv6 v3: ATSS for these first epochs"
    )
    train.add_argument("--neck", choices=("reppan", "bic"), default="reppan", help="bic: YOLOv6 v3 BiC top-down fusion")
    train.add_argument("--sppf", choices=("simsppf", "simcspsppf"), default="simsppf", help="yolo_rep_*: SPPF block")
    train.add_argument("--aat", action="store_true", help="anchor-aided training branch (removed at inference)")
    train.add_argument(
        "--eval-every", type=flags.non_negative_int, default=0, help="epochs between test mAP evaluations (0: at end)"
    )
    train.add_argument(
        "--per-kind", type=flags.positive_int, default=20, help="ds-synth: training images per defect kind"
    )
    train.add_argument("--test-fraction", type=flags.fraction, default=0.2, help="folders: share of images held out")
    train.add_argument(
        "--conf", type=flags.probability, default=0.25, help="confidence of the boxes drawn in the report"
    )
    train.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints (needs --out)")
    train.add_argument("--seed", type=flags.non_negative_int, default=0)
    train.add_argument("--threads", type=flags.non_negative_int, default=None)
    flags.add_compute(train)
    flags.add_sync_bn(train)
    train.set_defaults(func=_cmd_train)

    predict = verbs.add_parser("predict", help="detect boxes in images: drawn images and predictions.csv")
    flags.add_run(predict, "written by `potpourri detect train`")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    predict.add_argument("--conf", type=flags.probability, default=0.25)
    predict.add_argument("--iou", type=flags.probability, default=0.6, help="NMS IoU threshold")
    predict.add_argument("--no-reparam", action="store_true", help="run the multi-branch model (default: fused)")
    predict.add_argument("--out", help="output folder (default RUN/predict/vN)")
    predict.add_argument("--resume", action="store_true", help="continue a killed predict in --out (same CSV)")
    predict.add_argument("--threads", type=flags.non_negative_int, default=None)
    flags.add_compute(predict)
    predict.set_defaults(func=_cmd_predict)

    evaluate = verbs.add_parser("eval", help="COCO mAP@0.5 and mAP@0.5:0.95 of a trained detector")
    flags.add_run(evaluate, "written by `potpourri detect train`")
    evaluate.add_argument("--data", required=True, help="ds-synth:CATEGORY, a YOLO folder or a COCO json")
    evaluate.add_argument("--split", choices=("test", "all"), default="test")
    evaluate.add_argument("--reparam", action="store_true", help="evaluate the re-parameterised model")
    evaluate.add_argument("--per-kind", type=flags.positive_int, default=20)
    evaluate.add_argument("--test-fraction", type=flags.fraction, default=0.2)
    evaluate.add_argument("--seed", type=flags.non_negative_int, default=0)
    evaluate.add_argument("--out", help="output folder (default RUN/eval/vN)")
    evaluate.add_argument("--threads", type=flags.non_negative_int, default=None)
    flags.add_compute(evaluate)
    evaluate.set_defaults(func=_cmd_eval)

    mask = verbs.add_parser("mask-train", help="train a mask head on the frozen detector (Mask Frozen-DETR style)")
    flags.add_run(mask, "written by `potpourri detect train`")
    mask.add_argument("--data", required=True, help="ds-synth:CATEGORY (instance masks from DS-Synth)")
    mask.add_argument("--steps", type=flags.positive_int, default=600)
    mask.add_argument(
        "--seconds", type=flags.positive_float, default=None, help="stop after this wall clock (includes caching)"
    )
    mask.add_argument("--lr", type=flags.positive_float, default=2e-3)
    mask.add_argument("--per-kind", type=flags.positive_int, default=20)
    mask.add_argument("--seed", type=flags.non_negative_int, default=0)
    mask.add_argument("--out", help="output folder (default RUN/mask/vN)")
    mask.add_argument("--threads", type=flags.non_negative_int, default=None)
    mask.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints (needs --out)")
    flags.add_compute(mask)
    mask.set_defaults(func=_cmd_mask_train)
