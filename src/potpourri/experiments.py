"""``potpourri reproduce <experiment>``: every paper re-run at CPU scale, behind one verb.

An experiment is a function ``run(quick: bool, out: str | None) -> Run`` that writes ``results.md`` into its run
folder; ``quick`` is a seconds-long smoke run of the same code path (numbers not meaningful). Register a new one by
adding a line to ``EXPERIMENTS``; modules are imported only when their experiment runs.
"""

from __future__ import annotations

import argparse
import importlib

import torch

__all__ = ["EXPERIMENTS", "register_cli", "run_experiment"]

# name -> ("module:function", one-line help)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "autovp": (
        "potpourri.tune.visual_prompt:run",
        "AutoVP: padding prompt + label mapping on frozen Lite0, successive-halving search vs linear probing",
    ),
    "all-seeing": (
        "potpourri.models.allseeing:run",
        "All-Seeing-style region-text contrastive head (Lite0 RoI tokens vs MiniLM captions): retrieval accuracy",
    ),
    "defect-gen": ("potpourri.inspect.reproduce_defectgen:run", "segmentation mIoU: real vs + copy-paste / Defect-Gen"),
    "freeze-embed": ("potpourri.tune.cli:run_freeze_embed", "SGD vs AdamW vs SGD freeze-embed, ID and OOD accuracy"),
    "layer-proxies": ("potpourri.tune.proxy_study:run", "cheap layer-choice proxies vs the finetuning profile"),
    "ssprompt": (
        "potpourri.inspect.sam_prompt:run",
        "SSPrompt: learned class prompts for a frozen small SAM vs the best single click vs a supervised segmenter",
    ),
    "sam-clip": (
        "potpourri.inspect.sam_clip:run",
        "SAM-CLIP-style merging: small SAM + Lite0 teachers into one student, forgetting with vs without rehearsal",
    ),
    "opro": (
        "potpourri.tune.opro:run",
        "OPRO with SmolLM2-135M vs random search, same budget: tuning a cached linear probe (lr, wd, epochs)",
    ),
    "frozen-lm": (
        "potpourri.models.frozen_lm_reproduce:run",
        "a frozen LM layer (SmolLM2, MiniLM, controls) inside a small ViT: accuracy, robustness, filtering IoU",
    ),
    "semi-supervised": (
        "potpourri.tune.semisup:run",
        "FixMatch vs SimCLR + fine-tuning vs supervised, same labels and steps (paper rejected at ICLR 2024)",
    ),
    "smr": (
        "potpourri.models.smr:run",
        "token-merging student reconstructing teacher features vs MAE-style masking, linear probe (withdrawn)",
    ),
    "simdetr": (
        "potpourri.models.simdetr_reproduce:run",
        "SimDETR-style (withdrawn): feature-clustering proposals, pseudo-classes, self-training, low-label detection",
    ),
    "subtuning": ("potpourri.tune.cli:run_subtuning", "linear / full / SubTuning / LoRA against training-set size"),
}


def run_experiment(name: str, *, quick: bool = False, out: str | None = None):
    """Run one registered experiment and return its ``Run`` (``results.md`` inside)."""
    target, _ = EXPERIMENTS[name]
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)(quick, out)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    run = run_experiment(args.experiment, quick=args.quick, out=args.out)
    print((run.path / "results.md").read_text(), end="")
    print(f"run: {run.path}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``potpourri reproduce``."""
    p = subparsers.add_parser("reproduce", help="re-run a paper's experiment at CPU scale (tables in docs/results.md)")
    p.add_argument(
        "experiment",
        choices=sorted(EXPERIMENTS),
        help="; ".join(f"{name}: {help_}" for name, (_, help_) in sorted(EXPERIMENTS.items())),
    )
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run of the same code path")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="run folder (default runs/reproduce-<experiment>/vN)")
    p.set_defaults(func=_cmd_reproduce)
