"""``potpourri annotate`` (click-to-annotate with a SAM) and ``potpourri sam-train`` (the small SAM on DS-Synth).

``annotate`` writes a Defect Spectrum class-id mask: a single-channel uint8 PNG, 0 = background and ``--class-id``
on the segmented defect, the size of the input image.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from potpourri.cli import flags
from potpourri.core.errors import PotpourriError

__all__ = [
    "parse_box",
    "parse_point",
    "register",
]


def parse_point(text: str) -> tuple[float, float]:
    """``"x,y"`` → (x, y) in pixels."""
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise PotpourriError(f"point '{text}' is not x,y (two numbers, e.g. 120,64)") from None
    return x, y


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` → the box in pixels, corners ordered."""
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise PotpourriError(f"box '{text}' is not x0,y0,x1,y1 (four numbers, e.g. 10,20,90,80)") from None
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def _surface(text: str) -> str:
    """A DS-Synth surface name (argparse type)."""
    from potpourri.data.synth import CATEGORIES

    if text not in CATEGORIES:
        raise argparse.ArgumentTypeError(f"unknown DS-Synth surface '{text}'; choose from {', '.join(CATEGORIES)}")
    return text


def _cmd_annotate(args: argparse.Namespace) -> int:
    from potpourri.core.imaging import read_rgb
    from potpourri.segment.annotate import annotate, write_mask

    if not 1 <= args.class_id <= 255:
        raise PotpourriError(f"--class-id {args.class_id} must be 1..255 (0 is background)")
    image = read_rgb(args.image)
    positives = [parse_point(p) for p in args.points or []]
    negatives = [parse_point(p) for p in args.negative or []]
    points = np.array(positives + negatives, np.float32).reshape(-1, 2)
    labels = np.array([1] * len(positives) + [0] * len(negatives), np.int64)
    box = np.array(parse_box(args.box), np.float32) if args.box else None
    mask = annotate(image, points, labels, box, model=args.run, sam_weights=args.sam_weights, device=args.device,
                    precision=args.precision)  # fmt: skip
    path = write_mask(mask, args.class_id, args.out)
    print(f"{path}: {int(mask.sum())} pixels of class {args.class_id} ({mask.mean():.1%} of the image)")
    return 0


def _train_options(args: argparse.Namespace):
    """``TrainOptions`` from the compute and checkpoint flags of a training verb."""
    from potpourri.core.training import TrainOptions

    return TrainOptions(device=args.device, precision=args.precision, resume=args.resume, progress=True,
                        checkpoint_every=args.checkpoint_every, sync_bn=getattr(args, "sync_bn", False))  # fmt: skip


def _cmd_sam_train(args: argparse.Namespace) -> int:
    import torch

    from potpourri.models.sam import SamConfig
    from potpourri.segment.sam import run_sam_experiment

    if args.threads:
        torch.set_num_threads(args.threads)
    config = SamConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       prompt_dim=args.prompt_dim, train_neck=not args.freeze_neck)  # fmt: skip
    summary = run_sam_experiment(out=args.out, per_category=args.per_category, test_per_category=args.test_per_category,
                                 config=config, options=_train_options(args))  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_ssprompt(args: argparse.Namespace) -> int:
    import torch

    from potpourri.papers.ssprompt import SSPromptConfig, run_ssprompt_experiment

    if args.threads:
        torch.set_num_threads(args.threads)
    config = SSPromptConfig(category=args.category, image_size=args.image_size, sam_steps=args.sam_steps,
                            prompt_steps=args.steps, segmenter_steps=args.segmenter_steps, seed=args.seed)  # fmt: skip
    run = run_ssprompt_experiment(config, out=args.out, sam_path=args.sam, options=_train_options(args))
    print((run.path / "results.md").read_text(), end="")
    print(f"run: {run.path}")
    return 0


def _cmd_sam_clip(args: argparse.Namespace) -> int:
    import torch

    from potpourri.papers.sam_clip import SamClipConfig, check_teachers, run_sam_clip_experiment

    _check_teacher_flags(args)  # all checked before anything is written
    if args.teacher_b_dpam is not None:
        _check_dpam_block(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SamClipConfig(image_size=args.image_size, student=args.student, stage1_steps=args.stage1_steps,
                           probe_steps=args.probe_steps, stage2_steps=args.stage2_steps, lr=args.lr,
                           backbone_lr=args.backbone_lr or None, batch_size=args.batch_size,
                           rehearsal_shares=tuple(args.rehearsal), seed=args.seed, teacher_b=args.teacher_b,
                           clip_path=args.clip, clip_steps=args.clip_steps, held_out=tuple(args.held_out),
                           b_per_kind=args.b_per_kind, zs_per_kind=args.zs_per_kind,
                           segmenter_steps=args.segmenter_steps, margin=args.margin,
                           dpam_from=args.teacher_b_dpam, sam_weights=args.sam_weights, clip_arch=args.clip_arch,
                           clip_weights=args.clip_weights)  # fmt: skip
    check_teachers(config, args.sam)
    run = run_sam_clip_experiment(config, out=args.out, sam_path=args.sam, options=_train_options(args))
    print((run.path / "results.md").read_text(), end="")
    print(f"run: {run.path}")
    return 0


def _check_teacher_flags(args: argparse.Namespace) -> None:
    """--sam-weights / --clip-arch / --clip-weights: teacher B = clip (the language path), and a known open_clip ViT."""
    if (args.sam_weights or args.clip_arch or args.clip_weights) and args.teacher_b != "clip":
        raise PotpourriError("--sam-weights / --clip-arch / --clip-weights apply to --teacher-b clip (with language)")
    if args.clip_arch:
        from potpourri.models.open_clip_loader import open_clip_vision_layers

        open_clip_vision_layers(args.clip_arch)  # an unknown name or a non-ViT tower: one line, now


def _check_dpam_block(args: argparse.Namespace) -> None:
    """--teacher-b-dpam needs teacher B = clip and a block of its ViT (given clip, open_clip or the default clip)."""
    import json
    from pathlib import Path

    from potpourri.models.clip_small import DEFAULT_CONFIG

    if args.teacher_b != "clip":
        raise PotpourriError("--teacher-b-dpam applies to --teacher-b clip (a ViT); lite0 has no attention to change")
    if args.clip_arch:
        from potpourri.models.open_clip_loader import open_clip_vision_layers

        depth = open_clip_vision_layers(args.clip_arch)
    else:
        config = json.loads((Path(args.clip) / "config.json").read_text()) if args.clip else DEFAULT_CONFIG
        depth = config.get("vision", {}).get("depth", DEFAULT_CONFIG["vision"]["depth"])
    if not 1 <= args.teacher_b_dpam <= depth:
        raise PotpourriError(f"--teacher-b-dpam {args.teacher_b_dpam}: the clip's ViT has blocks 1..{depth}")


def _add_training(parser: argparse.ArgumentParser, *, every: int) -> None:
    """``--device``, ``--precision``, ``--resume`` and ``--checkpoint-every`` of a training verb."""
    flags.add_compute(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    help_text = f"steps between checkpoints in <out>/checkpoints (default {every}; 0: only at the end)"
    parser.add_argument("--checkpoint-every", type=flags.non_negative_int, default=every, help=help_text)


def _register_sam_family(subparsers: argparse._SubParsersAction) -> None:
    """``ssprompt`` (learned class prompts for a frozen SAM) and ``sam-clip`` (two-teacher merging)."""
    s = subparsers.add_parser("ssprompt", help="learn one prompt per defect class for a frozen SAM (0 clicks)")
    s.add_argument("--sam", help="a `potpourri sam-train` / ssprompt SAM folder (default: pretrain one)")
    s.add_argument("--category", default="brick", help="DS-Synth texture the prompts are learned on")
    s.add_argument("--image-size", type=flags.image_side, default=96)
    s.add_argument(
        "--sam-steps", type=flags.positive_int, default=2000, help="SAM pretraining steps when --sam is not given"
    )
    s.add_argument("--steps", type=flags.positive_int, default=300, help="prompt-learning steps per class")
    s.add_argument("--segmenter-steps", type=flags.positive_int, default=400, help="the supervised segmenter's steps")
    s.add_argument("--seed", type=flags.non_negative_int, default=0)
    s.add_argument("--threads", type=flags.non_negative_int, default=1)
    s.add_argument("--out", help="run folder (default runs/ssprompt/vN)")
    _add_training(s, every=100)
    s.set_defaults(func=_cmd_ssprompt)

    c = subparsers.add_parser(
        "sam-clip", help="merge a SAM and a CLIP-style teacher into one student; forgetting and zero-shot by text"
    )
    c.add_argument("--sam", help="SAM folder (teacher A; its image_size must match; default: pretrain one)")
    c.add_argument("--sam-weights", type=flags.existing_path, metavar="PATH",
                   help="teacher A = an official SAM checkpoint on disk (sam_vit_b_01ec64.pth, or mobile_sam.pt "
                   "with mobilesam-mirror), run at --image-size; the student copies its encoder; never downloaded",
                   )  # fmt: skip
    c.add_argument("--student", default="sam",
                   help="timm model (random init, cut at stride 16), or 'sam' (teacher A's encoder)")  # fmt: skip
    c.add_argument("--image-size", type=flags.image_side, default=96)
    c.add_argument(
        "--stage1-steps",
        type=flags.non_negative_int,
        default=0,
        help="A-only steps (0 for --student sam; ~600 otherwise)",
    )
    c.add_argument("--probe-steps", type=flags.positive_int, default=200)
    c.add_argument("--stage2-steps", type=flags.non_negative_int, default=150)
    c.add_argument("--lr", type=flags.positive_float, default=2e-3, help="heads (and a random-init backbone)")
    c.add_argument(
        "--backbone-lr", type=flags.non_negative_float, default=2e-4, help="backbone learning rate (0: use --lr)"
    )
    c.add_argument("--batch-size", type=flags.positive_int, default=8)
    c.add_argument(
        "--rehearsal", type=flags.probability, nargs="+", default=[0.5], help="share(s) of teacher A data in stage 2"
    )
    help_b = "clip: our clip_vit_tiny_minilm (with language); lite0: the ImageNet Lite0 feature (no language)"
    c.add_argument("--teacher-b", choices=("clip", "lite0"), default="clip", help=help_b)
    help_clip = "clip_vit_tiny_minilm model folder (config.json + model.safetensors); default: train one here"
    c.add_argument("--clip", type=flags.existing_path, help=help_clip)
    c.add_argument("--clip-steps", type=flags.positive_int, default=300, help="steps when training the clip here")
    c.add_argument("--clip-arch", metavar="ARCH",
                   help="teacher B = this open_clip ViT (e.g. ViT-B-16, or a .json model config) with --clip-weights, "
                   "run at --image-size; MaskCLIP-style patch tokens (ln_post, proj); needs open_clip")  # fmt: skip
    c.add_argument("--clip-weights", type=flags.existing_path, metavar="PATH",
                   help="local open_clip checkpoint for --clip-arch (.safetensors / .bin; never downloaded)",
                   )  # fmt: skip
    c.add_argument("--teacher-b-dpam", type=flags.positive_int, default=None, metavar="BLOCK",
                   help="teacher B's patch tokens from DPAM's V-V stream from this block on (AnomalyCLIP's attention "
                   "surgery; e.g. 3 of the default 6); default: the ordinary q-k tokens")  # fmt: skip
    c.add_argument("--held-out", type=_surface, nargs="+", default=["moon", "tissue"],
                   help="DS-Synth surfaces every test uses (none may be in the clip's training data)")  # fmt: skip
    c.add_argument("--b-per-kind", type=flags.positive_int, default=12, help="teacher B images per kind and surface")
    c.add_argument("--zs-per-kind", type=flags.positive_int, default=8, help="zero-shot test images per defect kind")
    c.add_argument("--segmenter-steps", type=flags.positive_int, default=400, help="the supervised baseline's steps")
    c.add_argument("--margin", type=flags.non_negative_float, default=0.0,
                   help="zero-shot: cosine a defect prompt must beat the background prompt by")  # fmt: skip
    c.add_argument("--seed", type=flags.non_negative_int, default=0)
    c.add_argument("--threads", type=flags.non_negative_int, default=1)
    c.add_argument("--out", help="run folder (default runs/sam-clip/vN)")
    _add_training(c, every=50)
    flags.add_sync_bn(c)  # a random-init student's BatchNorm trains; the default copy of teacher A keeps it frozen
    c.set_defaults(func=_cmd_sam_clip)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``annotate``, ``sam-train``, ``ssprompt`` and ``sam-clip`` to the ``potpourri`` command."""
    p = subparsers.add_parser("annotate", help="click-to-annotate: points/box prompts → a class-id defect mask PNG")
    p.add_argument("image", help="RGB image to annotate")
    p.add_argument("--points", nargs="+", metavar="X,Y", help="positive clicks (pixels)")
    p.add_argument("--negative", nargs="+", metavar="X,Y", help="negative clicks (pixels)")
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="box prompt (pixels)")
    p.add_argument("--run", help="a `potpourri sam-train` run folder")
    p.add_argument("--model", dest="run", help=argparse.SUPPRESS)  # the old spelling, kept for one release
    p.add_argument("--sam-weights", help="official sam_vit_b.pth or mobile_sam.pt (needs segment-anything/mobile_sam)")
    p.add_argument(
        "--class-id", type=flags.positive_int, default=1, help="class id written on the mask (DS-Synth: 1..6)"
    )
    p.add_argument("--out", required=True, help="mask PNG to write (uint8 class ids, Defect Spectrum format)")
    flags.add_compute(p)
    p.set_defaults(func=_cmd_annotate)

    t = subparsers.add_parser("sam-train", help="train the small Lite0 SAM on DS-Synth; report click/box mIoU")
    t.add_argument("--out", help="run folder (default runs/sam/vN)")
    t.add_argument("--steps", type=flags.positive_int, default=1200)
    t.add_argument("--batch-size", type=flags.positive_int, default=8)
    t.add_argument("--lr", type=flags.positive_float, default=1e-3)
    t.add_argument("--prompt-dim", type=flags.positive_int, default=64)
    t.add_argument("--freeze-neck", action="store_true", help="train only prompt encoder and mask decoder")
    t.add_argument("--per-category", type=flags.positive_int, default=100, help="training images per texture")
    t.add_argument("--test-per-category", type=flags.positive_int, default=20, help="held-out images per texture")
    t.add_argument("--seed", type=flags.non_negative_int, default=0)
    t.add_argument("--threads", type=flags.non_negative_int, default=1)
    _add_training(t, every=200)
    t.set_defaults(func=_cmd_sam_train)
    _register_sam_family(subparsers)
