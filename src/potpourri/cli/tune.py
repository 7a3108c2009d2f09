"""``potpourri tune`` and ``potpourri select-layers``: thin shells over ``fit`` and ``greedy_select``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from potpourri.cli import flags
from potpourri.core.errors import PotpourriError

__all__ = [
    "register",
]


def _model_and_data(args: argparse.Namespace) -> tuple[torch.nn.Module, Dataset, Dataset, list[str]]:
    import potpourri
    from potpourri.tune.data import check_workers, load_image_data

    check_workers(args.workers)
    if args.threads:
        torch.set_num_threads(args.threads)
    probe = potpourri.create_model(args.model, pretrained=False)
    cfg = getattr(probe, "pretrained_cfg", {}) or {}
    mean, std = tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))
    img_size = args.image_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    if getattr(args, "strategy", None) == "visual-prompt":  # AutoVP: ImageNet head kept, prompt takes [0, 1] px
        from potpourri.tune.visual_prompt import VPConfig, build_visual_prompt

        train, val, classes = load_image_data(
            args.data, img_size=img_size, mean=(0.0,) * 3, std=(1.0,) * 3, seed=args.seed
        )
        source = potpourri.create_model(args.model, pretrained=args.pretrained)
        model = build_visual_prompt(
            source, len(classes), VPConfig("fully", width=max(1, img_size // 12)), canvas=img_size
        )
        return model, train, val, classes
    train, val, classes = load_image_data(args.data, img_size=img_size, mean=mean, std=std, seed=args.seed)
    torch.manual_seed(args.seed)  # the new head's initialisation
    model = potpourri.create_model(args.model, pretrained=args.pretrained, num_classes=len(classes))
    return model, train, val, classes


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
        "seed": args.seed,
        "num_workers": args.workers,
        "progress": not args.no_progress,
    }


def _cmd_tune(args: argparse.Namespace) -> int:
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.models.blocks import block_map, check_blocks
    from potpourri.tune.strategies import get_strategy
    from potpourri.tune.trainer import fit

    if args.resume and not args.out:
        raise PotpourriError("--resume needs --out DIR, the folder of the run to continue")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not args.out:
        raise PotpourriError("under torchrun pass --out DIR, so that every process uses the same run folder")
    seed_everything(args.seed)
    model, train, val, classes = _model_and_data(args)
    strategy_kwargs: dict[str, Any] = {}
    if args.momentum is not None:
        strategy_kwargs["momentum"] = args.momentum
    blocks = [b for b in args.blocks.split(",") if b] if args.blocks else None
    get_strategy(args.strategy, **strategy_kwargs)  # bad names fail before a run folder exists
    if blocks:
        check_blocks(blocks, block_map(model))
    run = new_run("tune", args.out)
    result = fit(
        model,
        train,
        val,
        args.strategy,
        blocks=blocks,
        strategy_kwargs=strategy_kwargs,
        out=run.path,
        resume=args.resume,
        **_training_options(args),
    )
    plan = result.plan
    print(
        f"{args.strategy}: {plan['trainable_params']:,} of {plan['total_params']:,} params trained "
        f"({plan['trainable_pct']:.2f}%), classes {classes}"
    )
    print(f"val_acc {result.final.get('val_acc', float('nan')):.4f}  ({result.seconds:.1f} s)")
    print(f"run: {run.path}")
    return 0


def _cmd_select_layers(args: argparse.Namespace) -> int:
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.tune.layer_select import greedy_select, proxy_scores

    seed_everything(args.seed)
    model, train, _, _ = _model_and_data(args)
    run = new_run("select-layers", args.out)
    run.write_config(vars(args) | {"func": None})
    summary: dict[str, Any] = {}
    if args.proxy != "none":
        scores = proxy_scores(model, train, method=args.proxy)
        ranking = sorted((e for e in scores if e != "head"), key=scores.get, reverse=True)
        summary["proxy"] = {"method": args.proxy, "scores": scores, "ranking": ranking}
        print(f"{args.proxy} ranking: {', '.join(ranking[:8])}{' …' if len(ranking) > 8 else ''}")
    if not args.proxy_only:
        candidates = [b for b in args.candidates.split(",") if b] if args.candidates else None
        selection = greedy_select(
            model,
            train,
            candidates=candidates,
            folds=args.folds,
            epsilon=args.epsilon,
            max_blocks=args.max_blocks,
            max_params=args.max_params,
            time_budget_s=args.time_budget,
            **{**_training_options(args), "progress": False},
        )
        summary["greedy"] = {
            "chosen": selection.chosen,
            "cv_accuracy": selection.score,
            "linear_probe_cv_accuracy": selection.linear_probe,
            "rounds": [{"base": r.base, "scores": r.scores} for r in selection.rounds],
            "stop_reason": selection.stop_reason,
            "trainings": selection.trainings,
            "seconds": round(selection.seconds, 2),
        }
        print(
            f"greedy: {selection.chosen or '[] (linear probe)'}  cv acc {selection.score:.4f} "
            f"(linear probe {selection.linear_probe:.4f}); {selection.stop_reason}"
        )
    run.write_summary(summary)
    print(f"run: {run.path}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="efficientnet_lite0", help="model name (default efficientnet_lite0)")
    p.add_argument("--data", required=True, help="ImageFolder DIR (or DIR/train + DIR/val) or ds-synth:<task>")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    flags.add_image_size(p, default=None, help="input size (default: the model's)", old="--img-size")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default=None, help="default: the strategy's")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--ema", type=float, default=None, metavar="DECAY", help="evaluate an EMA of the weights")
    p.add_argument("--bn", choices=["eval", "train", "recalibrate"], default="eval", help="BatchNorm policy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--out", help="run folder (default runs/<verb>/vN)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(subparsers: Any) -> None:
    """Add ``tune`` and ``select-layers`` to the ``potpourri`` command."""
    from potpourri.tune.strategies import STRATEGIES

    p = subparsers.add_parser("tune", help="adapt a pretrained model with one strategy (linear, subtuning, lora, …)")
    _add_common(p)
    p.add_argument("--strategy", default="linear", help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument("--blocks", help="comma-separated block-map entries for --strategy subtuning")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0.9)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=_cmd_tune)

    p = subparsers.add_parser("select-layers", help="choose the blocks to fine-tune (greedy k-fold CV + proxies)")
    _add_common(p)
    p.add_argument("--candidates", help="comma-separated block-map entries to consider (default: all but head)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epsilon", type=float, default=0.01, help="stop when the best CV gain is below this")
    p.add_argument("--max-blocks", type=int, default=3)
    p.add_argument("--max-params", type=int, default=None)
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS")
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
    import potpourri
    from potpourri.core.registry import count_macs
    from potpourri.core.runs import new_run
    from potpourri.tune.multitask import MultiTaskModel, load_task_model

    runs = dict(spec.split("=", 1) if "=" in spec else (Path(spec).name, spec) for spec in args.runs)
    backbone = potpourri.create_model(args.model, pretrained=True).eval()
    tasks = {name: load_task_model(backbone, path) for name, path in runs.items()}
    shared = MultiTaskModel(backbone, tasks)
    x = torch.randn(2, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = shared(x)
        worst = max((outputs[n] - m.eval()(x)).abs().max().item() for n, (m, _) in tasks.items())
    shape = (1, 3, args.image_size, args.image_size)
    macs = {"shared": count_macs(shared, shape), "separate": sum(count_macs(m, shape) for m, _ in tasks.values())}
    params = {"shared": shared.parameter_counts()["total"]}
    params["separate"] = sum(sum(p.numel() for p in m.parameters()) for m, _ in tasks.values())
    run = new_run("merge-tasks", args.out)
    run.write_config({"runs": runs, "model": args.model, "img_size": args.image_size})
    run.write_summary({**shared.describe(), "macs": macs, "params_total": params, "max_abs_output_diff": worst})
    for name, info in shared.describe()["tasks"].items():
        print(f"{name}: tuned {', '.join(info['tuned'])}; leaves the shared trunk at {info['branches_at']}")
    print(
        f"{len(tasks)} tasks: {macs['shared'] / 1e9:.3f} vs {macs['separate'] / 1e9:.3f} GMACs separately "
        f"({macs['separate'] / macs['shared']:.2f}x), {params['shared'] / 1e6:.2f} M vs "
        f"{params['separate'] / 1e6:.2f} M parameters ({params['separate'] / params['shared']:.2f}x); "
        f"max |output difference| {worst:.1e}"
    )
    print(f"run: {run.path}")
    return 0
