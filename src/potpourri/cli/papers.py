"""``potpourri demo`` and ``potpourri reproduce <experiment>``: the demo and every paper re-run at CPU scale."""

from __future__ import annotations

import argparse
import os

import torch

from potpourri.cli import flags
from potpourri.core.errors import PotpourriError


def _options(args: argparse.Namespace):
    from potpourri.core.training import TrainOptions

    return TrainOptions(device=args.device, precision=args.precision, progress=False)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from potpourri.papers.registry import run_experiment

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process would write the same run: refuse, clearly
        raise PotpourriError("reproduce runs a whole experiment in one process; under torchrun use the training "
                             "verbs (tune, inspect fit/segment-train, detect train, vlm train, sam-clip) or the "
                             "Python API, whose loops shard")  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    run = run_experiment(args.experiment, quick=args.quick, out=args.out, options=_options(args), seed=args.seed)
    print((run.path / "results.md").read_text(), end="")
    print(f"run: {run.path}")
    return 0


def _register_reproduce(subparsers: argparse._SubParsersAction) -> None:
    """Add ``potpourri reproduce``."""
    from potpourri.papers.registry import EXPERIMENTS, SEEDED

    p = subparsers.add_parser("reproduce", help="re-run a paper's experiment at CPU scale (tables in docs/results.md)")
    p.add_argument(
        "experiment",
        choices=sorted(EXPERIMENTS),
        help="; ".join(f"{name}: {help_}" for name, (_, help_) in sorted(EXPERIMENTS.items())),
    )
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run of the same code path")
    p.add_argument("--threads", type=flags.non_negative_int, default=None)
    p.add_argument("--out", help="run folder (default runs/reproduce-<experiment>/vN)")
    p.add_argument("--seed", type=flags.non_negative_int, default=None,
                   help=f"the experiment's seed (default: its own); only for {', '.join(SEEDED)}")  # fmt: skip
    flags.add_compute(p)
    p.set_defaults(func=_cmd_reproduce)


def _cmd_demo(args: argparse.Namespace) -> int:
    from potpourri.papers.demo import run_demo, summary_lines

    run = run_demo(out=args.out, seed=args.seed, threads=args.threads, options=_options(args))
    print("\n".join(summary_lines(run.read_summary())))
    print(f"report: {run.path / 'report.html'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``potpourri demo`` and ``potpourri reproduce``."""
    p = subparsers.add_parser("demo", help="offline end-to-end demo: data, features, probe, report.html")
    p.add_argument("--out", help="run folder (default runs/demo/vN)")
    p.add_argument("--seed", type=flags.non_negative_int, default=0)
    p.add_argument("--threads", type=flags.non_negative_int, default=None, help="torch threads (default: all cores)")
    flags.add_compute(p)
    p.set_defaults(func=_cmd_demo)
    _register_reproduce(subparsers)
