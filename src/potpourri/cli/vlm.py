"""``potpourri vlm train|eval``: the MiniGPT-v2-style assistant on DS-Synth instructions, as a run folder.

``train`` writes ``config.yaml``, ``env.json``, ``metrics.csv`` (loss per logged step), ``state/stage<N>/``
(resumable checkpoints every ``--checkpoint-every`` steps; ``--resume`` continues from them),
``trainable.safetensors`` (projection, and LoRA after stage 2; once every stage is trained), ``predictions.jsonl`` and
``summary.json`` (test metrics of the model and of the question-only baseline). ``eval`` rebuilds the model from a
run's ``config.yaml`` and scores it again.

Example:
    potpourri vlm train --image-size 128 --n-train 140 --steps 150 --kinds yesno,refer --threads 1
    potpourri vlm train --lm tiny --encoder test_efficientnet --random --steps 5     # seconds: a smoke run
    potpourri vlm eval runs/vlm/v0
    potpourri vlm train --out runs/vlm/v0 --resume      # after a kill: continue from the last checkpoint
    potpourri vlm train --device cuda --precision bf16 ...                       # where and in which precision
    potpourri vlm baseline --image-size 128 --n-train 140 --kinds yesno,refer --threads 1   # the non-LLM baseline
    potpourri vlm train --arch minigpt4 --steps 100 --lora-steps 50 ...    # MiniGPT-4: captions, then descriptions
    potpourri vlm train --curriculum --steps 100 --lora-steps 100 --stage3-steps 50   # MiniGPT-v2's three stages
    potpourri vlm train --random-lm ...              # the same LM re-initialised: what pretraining contributes

``--arch minigpt4`` and ``--curriculum`` train stage by stage through ``potpourri.vlm.minigpt.run_phased`` and
evaluate after every stage (``summary.json`` ``stages``); ``--eval-each-stage`` does so for a plain run too.

``baseline`` trains the non-LLM baseline (``potpourri.papers.vlm_baseline``: segmenter boxes + defect-classifier
answers) on the same training images and scores it on the same test instructions as ``train`` with the same data
options; its ``summary.json`` holds the classifier-answer and segmenter-answer variants and the question-only one.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from potpourri.cli import flags
from potpourri.core.errors import PotpourriError

__all__ = [
    "register",
]

_DEFAULT_KINDS = "yesno,refer,list,caption"


def _print_summary(summary: dict[str, Any]) -> None:
    model, base = summary["model"], summary["question_only_baseline"]
    names = [k for k in model if not k.startswith("n_")]
    print(f"{'metric':<18} {'model':>8} {'baseline':>9}   n")
    for name in names:
        n = model.get(f"n_{name.split('_')[0]}", "")
        print(f"{name:<18} {model[name]:>8.3f} {base.get(name, float('nan')):>9.3f}   {n}")
    print(f"seconds: {summary['seconds']:.0f}")


def _cmd_train(args: argparse.Namespace) -> int:
    from potpourri.core.training import TrainOptions
    from potpourri.vlm.pipeline import run_train
    from potpourri.vlm.train import parse_kinds

    if args.threads:
        torch.set_num_threads(args.threads)
    options = TrainOptions(device=args.device, precision=args.precision, resume=args.resume,
                           checkpoint_every=args.checkpoint_every)  # fmt: skip
    how = ("func", "out", "threads", "vlm_command", "resume", "device", "precision")  # not the run's content
    cfg = {k: v for k, v in vars(args).items() if k not in how}
    cfg["kinds"] = ",".join(parse_kinds(cfg["kinds"]))
    if cfg["arch"] == "minigpt4" and cfg["curriculum"]:
        raise PotpourriError("--curriculum is MiniGPT-v2's; MiniGPT-4 has its own two stages (drop one of them)")
    if cfg["qformer_from"] and cfg["arch"] != "minigpt4":
        raise PotpourriError("--qformer-from is for --arch minigpt4 (MiniGPT-v2 has no Q-Former)")
    if cfg["stage3_steps"] and not cfg["curriculum"]:
        raise PotpourriError("--stage3-steps needs --curriculum (the third stage is MiniGPT-v2's instruction tuning)")
    if cfg["arch"] == "minigpt4" or cfg["curriculum"] or cfg["eval_each_stage"]:
        from potpourri.vlm.minigpt import run_phased

        run = run_phased(cfg, args.out, options=options)
        if run is None:  # another process of a torchrun job: rank 0 reports
            return 0
        for stage in run.read_summary()["stages"]:
            shown = ", ".join(f"{k} {v:.3f}" for k, v in stage["model"].items() if not k.startswith("n_"))
            print(f"after {stage['name']} ({stage['steps']} steps): {shown}")
    else:
        run = run_train(cfg, args.out, options=options)
        if run is None:  # another process of a torchrun job: rank 0 reports
            return 0
    _print_summary(run.read_summary())
    print(f"run: {run.path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from potpourri.vlm.pipeline import run_eval

    if args.threads:
        torch.set_num_threads(args.threads)
    ids = None if args.task_ids is None else args.task_ids == "on"
    summary = run_eval(args.run, n_test=args.n_test, task_identifiers=ids, device=args.device, precision=args.precision)
    _print_summary(summary)
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from potpourri.core.training import TrainOptions
    from potpourri.papers.vlm_baseline import run_baseline
    from potpourri.vlm.train import parse_kinds

    if args.threads:
        torch.set_num_threads(args.threads)
    skip = ("func", "out", "threads", "vlm_command", "device", "precision")
    cfg = {k: v for k, v in vars(args).items() if k not in skip}
    cfg["kinds"] = ",".join(parse_kinds(cfg["kinds"]))
    run = run_baseline(cfg, args.out, options=TrainOptions(device=args.device, precision=args.precision))
    summary = run.read_summary()
    _print_summary(summary)
    segmenter = summary["segmenter_answers"]
    print(
        "segmenter-only answers: " + ", ".join(f"{k} {v:.3f}" for k, v in segmenter.items() if not k.startswith("n_"))
    )
    print(f"run: {run.path}")
    return 0


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", default="efficientnet_lite0", help="a registered or timm model name")
    parser.add_argument("--random", dest="pretrained", action="store_false", help="random weights (smoke runs)")
    parser.add_argument("--image-size", type=flags.image_side, default=128)
    parser.add_argument("--categories", type=lambda s: s.split(","), default=["brick"])
    parser.add_argument(
        "--n-train", type=flags.positive_int, default=140, help="train images per category (kinds cycle)"
    )
    parser.add_argument("--n-test", type=flags.positive_int, default=70, help="test images per category")
    parser.add_argument("--kinds", default=_DEFAULT_KINDS, help="instruction kinds, comma-separated")
    parser.add_argument("--no-task-ids", dest="task_identifiers", action="store_false", help="drop [task] (ablation)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``potpourri vlm train|eval|baseline``."""
    vlm = subparsers.add_parser("vlm", help="MiniGPT-v2-style VLM on DS-Synth: train | eval | baseline")
    verbs = vlm.add_subparsers(dest="vlm_command", required=True)
    train = verbs.add_parser("train", help="train the projection (stage 1), optionally LoRA (stage 2), then evaluate")
    train.add_argument("--lm", default="smollm2_135m", help="smollm2_135m | tiny (random, tests) | a HF model folder")
    train.add_argument(
        "--arch",
        default="minigpt-v2",
        choices=("minigpt-v2", "minigpt4"),
        help="minigpt-v2: merged tokens + linear (+ LoRA); minigpt4: Q-Former + one linear, frozen LM",
    )
    train.add_argument(
        "--queries",
        dest="num_queries",
        type=flags.positive_int,
        default=32,
        help="minigpt4: Q-Former queries (image tokens per image)",
    )
    train.add_argument(
        "--qformer-from",
        type=flags.existing_path,
        default="",
        help="minigpt4: a SEED tokenizer file (visual_tokenizer.save_tokenizer) whose Q-Former loads and stays frozen",
    )
    train.add_argument(
        "--random-lm",
        action="store_true",
        help="re-initialise the LM (same config and tokenizer): what its pretraining contributes",
    )
    train.add_argument(
        "--curriculum",
        action="store_true",
        help="MiniGPT-v2's three stages: broad captions+regions, multi-task, instruction tuning",
    )
    train.add_argument(
        "--eval-each-stage",
        action="store_true",
        help="evaluate after every stage, with caption ROUGE-L/BLEU-1 (always on with minigpt4 / --curriculum)",
    )
    train.add_argument(
        "--stage3-steps",
        type=flags.non_negative_int,
        default=0,
        help="--curriculum: instruction-tuning steps after --lora-steps of multi-task",
    )
    train.add_argument("--merge", default="1x4", choices=("none", "1x4", "2x2"))
    train.add_argument("--vision-norm", action="store_true", help="LayerNorm on image tokens before the projection")
    train.add_argument(
        "--feature-index",
        type=int,
        default=-1,
        help="encoder level whose map becomes tokens (timm feature_info index; -1: final features)",
    )
    train.add_argument("--position", action="store_true", help="add each image token's (x, y) centre, learned map")
    train.add_argument("--lora-targets", default="q_proj,v_proj", help="LM modules that get LoRA, comma-separated")
    _add_data_arguments(train)
    train.add_argument(
        "--steps",
        type=flags.positive_int,
        default=200,
        help="stage-1 steps (projection; minigpt4: + Q-Former on captions; curriculum: broad data)",
    )
    train.add_argument(
        "--lora-steps",
        type=flags.non_negative_int,
        default=0,
        help="stage-2 steps afterwards (projection + LoRA; minigpt4: the linear layer on descriptions)",
    )
    train.add_argument("--lr", type=flags.positive_float, default=1e-3)
    train.add_argument("--lora-lr", type=flags.positive_float, default=2e-4)
    train.add_argument("--lora-rank", type=flags.positive_int, default=8)
    train.add_argument("--lora-alpha", type=flags.positive_float, default=16.0)
    train.add_argument("--batch-size", type=flags.positive_int, default=8)
    train.add_argument(
        "--max-new-tokens", type=flags.non_negative_int, default=0, help="0: 24, or 64 with caption/grounding kinds"
    )
    train.add_argument("--checkpoint-every", type=flags.positive_int, default=50)
    train.add_argument("--seed", type=flags.non_negative_int, default=0)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    flags.add_compute(train)
    train.add_argument("--threads", type=flags.non_negative_int, default=0, help="torch threads (0: leave as is)")
    train.add_argument("--out", default=None, help="run folder (default runs/vlm/v<N>)")
    train.set_defaults(func=_cmd_train)
    evaluate = verbs.add_parser("eval", help="score a trained run on the test split again")
    flags.add_run(evaluate, "written by `potpourri vlm train`")
    evaluate.add_argument("--n-test", type=flags.positive_int, default=None)
    evaluate.add_argument("--task-ids", choices=("on", "off"), default=None, help="override the run's identifiers")
    evaluate.add_argument("--threads", type=flags.non_negative_int, default=0)
    flags.add_compute(evaluate)
    evaluate.set_defaults(func=_cmd_eval)
    base = verbs.add_parser("baseline", help="non-LLM baseline: segmenter boxes + defect-classifier answers, scored")
    _add_data_arguments(base)
    base.add_argument("--seg-size", type=flags.image_side, default=128, help="segmenter working resolution")
    base.add_argument(
        "--seg-steps", type=flags.positive_int, default=200, help="segmenter training steps (frozen encoder)"
    )
    base.add_argument("--min-pixels", type=flags.positive_int, default=4, help="drop mask components smaller than this")
    base.add_argument("--seed", type=flags.non_negative_int, default=0)
    base.add_argument("--threads", type=flags.non_negative_int, default=0, help="torch threads (0: leave as is)")
    flags.add_compute(base)
    base.add_argument("--out", default=None, help="run folder (default runs/vlm/v<N>)")
    base.set_defaults(func=_cmd_baseline)
