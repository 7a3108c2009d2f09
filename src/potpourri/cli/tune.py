"""``potpourri tune`` and ``potpourri select-layers``: thin shells over ``fit`` and ``greedy_select``."""

from __future__ import annotations

import argparse
from typing import Any

from potpourri.cli import flags

__all__ = [
    "register",
]


def _training_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "optimizer": args.optimizer,
        "warmup_steps": args.warmup_steps,
        "grad_clip": args.grad_clip or None,
        "label_smoothing": args.label_smoothing,
        "ema_decay": args.ema,
        "bn": args.bn,
        "augment": args.augment,
        "seed": args.seed,
        "num_workers": args.workers,
        "progress": not args.no_progress,
        "device": args.device,
        "precision": args.precision,
    }


def _cmd_tune(args: argparse.Namespace) -> int:
    from potpourri.tune.pipeline import tune_run

    tune_run(
        blocks_spec=args.blocks,
        data=args.data,
        image_size=args.image_size,
        model_name=args.model,
        momentum=args.momentum,
        out=args.out,
        pretrained=args.pretrained,
        resume=args.resume,
        seed=args.seed,
        strategy=args.strategy,
        threads=args.threads,
        workers=args.workers,
        training=_training_options(args),
        cli_config=vars(args) | {"func": None},
    )
    return 0


def _cmd_select_layers(args: argparse.Namespace) -> int:
    from potpourri.tune.pipeline import select_layers_run

    select_layers_run(
        candidates_spec=args.candidates,
        data=args.data,
        epsilon=args.epsilon,
        folds=args.folds,
        image_size=args.image_size,
        max_blocks=args.max_blocks,
        max_params=args.max_params,
        model_name=args.model,
        out=args.out,
        pretrained=args.pretrained,
        proxy=args.proxy,
        proxy_only=args.proxy_only,
        seed=args.seed,
        threads=args.threads,
        time_budget=args.time_budget,
        workers=args.workers,
        training=_training_options(args),
        run_config=vars(args) | {"func": None},
    )
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="efficientnet_lite0", help="model name (default efficientnet_lite0)")
    p.add_argument(
        "--data",
        required=True,
        help="ImageFolder DIR (or DIR/train + DIR/val), ds-synth:classification (v1) or "
        "ds-synth-v2:classification (the v2 benchmark: defect types differ by shape only)",
    )
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    flags.add_image_size(p, default=None, help="input size (default: the model's)", old="--img-size")
    p.add_argument("--epochs", type=flags.positive_int, default=10)
    p.add_argument("--batch-size", type=flags.positive_int, default=32)
    p.add_argument("--lr", type=flags.positive_float, default=1e-3)
    p.add_argument("--weight-decay", type=flags.non_negative_float, default=0.0)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default=None, help="default: the strategy's")
    p.add_argument("--warmup-steps", type=flags.non_negative_int, default=0)
    p.add_argument("--grad-clip", type=flags.non_negative_float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--label-smoothing", type=flags.probability, default=0.0)
    p.add_argument(
        "--ema", type=flags.probability, default=None, metavar="DECAY", help="evaluate an EMA of the weights"
    )
    p.add_argument("--bn", choices=["eval", "train", "recalibrate"], default="eval", help="BatchNorm policy")
    p.add_argument("--augment", action="store_true", help="random flips and quarter turns of the training images")
    p.add_argument("--seed", type=flags.non_negative_int, default=0)
    p.add_argument("--workers", type=flags.non_negative_int, default=0, help="data-loading processes")
    p.add_argument("--threads", type=flags.non_negative_int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", help="run folder (default runs/<verb>/vN)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    flags.add_compute(p)
    flags.add_config(p)


def register(subparsers: Any) -> None:
    """Add ``tune`` and ``select-layers`` to the ``potpourri`` command."""
    from potpourri.tune.strategies import STRATEGIES

    p = subparsers.add_parser("tune", help="adapt a pretrained model with one strategy (linear, subtuning, lora, …)")
    _add_common(p)
    p.add_argument("--strategy", default="linear", help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument("--blocks", help="comma-separated block-map entries for --strategy subtuning or siamese-subtuning")
    p.add_argument("--momentum", type=flags.probability, default=None, help="SGD momentum (default 0.9)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=_cmd_tune)

    p = subparsers.add_parser("select-layers", help="choose the blocks to fine-tune (greedy k-fold CV + proxies)")
    _add_common(p)
    p.add_argument("--candidates", help="comma-separated block-map entries to consider (default: all but head)")
    p.add_argument("--folds", type=flags.positive_int, default=5)
    p.add_argument("--epsilon", type=flags.probability, default=0.01, help="stop when the best CV gain is below this")
    p.add_argument("--max-blocks", type=flags.positive_int, default=3)
    p.add_argument("--max-params", type=flags.positive_int, default=None)
    p.add_argument("--time-budget", type=flags.positive_float, default=None, metavar="SECONDS")
    p.add_argument("--proxy", choices=["grad_ratio", "fisher", "feature_change", "none"], default="grad_ratio")
    p.add_argument("--proxy-only", action="store_true", help="rank blocks by the proxy only (seconds, not hours)")
    p.set_defaults(func=_cmd_select_layers, epochs=5, momentum=None)

    p = subparsers.add_parser("merge-tasks", help="share one frozen backbone among SubTuning runs (multi-task model)")
    p.add_argument("runs", nargs="+", metavar="NAME=RUN", help="task name and its `potpourri tune --out` folder")
    p.add_argument("--model", default="efficientnet_lite0", help="the backbone every run tuned")
    flags.add_image_size(p, default=224, help="input size for the MACs count and the parity check", old="--img-size")
    p.add_argument("--out", help="run folder (default runs/merge-tasks/vN)")
    p.set_defaults(func=_cmd_merge_tasks)


def _cmd_merge_tasks(args: argparse.Namespace) -> int:
    """Build the shared model, check it reproduces every run's outputs, report compute and memory saved."""
    from potpourri.tune.pipeline import merge_tasks_run

    merge_tasks_run(image_size=args.image_size, model=args.model, out=args.out, run_specs=args.runs)
    return 0
