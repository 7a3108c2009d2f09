"""``potpourri vlm train|eval``: the MiniGPT-v2-style assistant on DS-Synth instructions, as a run folder.

``train`` writes ``config.yaml``, ``env.json``, ``metrics.csv`` (loss per logged step), ``trainable.safetensors``
(projection, and LoRA after stage 2), ``predictions.jsonl`` and ``summary.json`` (test metrics of the model and of
the question-only baseline). ``eval`` rebuilds the model from a run's ``config.yaml`` and scores it again.

Example:
    potpourri vlm train --image-size 128 --n-train 140 --steps 150 --kinds yesno,refer --threads 1
    potpourri vlm train --lm tiny --encoder test_efficientnet --random --steps 5     # seconds: a smoke run
    potpourri vlm eval runs/vlm/v0
    potpourri vlm baseline --image-size 128 --n-train 140 --kinds yesno,refer --threads 1   # the non-LLM baseline

``baseline`` trains the non-LLM baseline (``potpourri.papers.vlm_baseline``: segmenter boxes + defect-classifier
answers) on the same training images and scores it on the same test instructions as ``train`` with the same data
options; its ``summary.json`` holds the classifier-answer and segmenter-answer variants and the question-only one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from potpourri.cli import flags
from potpourri.core.errors import PotpourriError

__all__ = ["register", "run_baseline", "run_eval", "run_train"]

_DEFAULT_KINDS = "yesno,refer,list,caption"


def _evaluate_and_write(run, vlm, cfg: dict[str, Any], train_instructions, started: float) -> dict[str, Any]:
    from potpourri.core.io import atomic_write_bytes
    from potpourri.vlm.train import (
        encode_samples,
        evaluate_vlm,
        instruction_data,
        parse_kinds,
        score,
        trivial_predictions,
    )

    test_samples, test_instructions = instruction_data(cfg, "test", cfg["n_test"], offset_seed=1)
    features = encode_samples(vlm, test_samples)
    long_answers = {"caption", "grounding", "detection"} & set(parse_kinds(cfg["kinds"]))
    metrics, predictions = evaluate_vlm(
        vlm, features, test_instructions, max_new_tokens=cfg.get("max_new_tokens") or (64 if long_answers else 24)
    )
    baseline = score(test_instructions, trivial_predictions(train_instructions, test_instructions))
    lines = [
        json.dumps({"kind": i.kind, "prompt": i.prompt, "answer": i.answer, "prediction": p}) + "\n"
        for i, p in zip(test_instructions, predictions, strict=True)
    ]
    atomic_write_bytes(run.path / "predictions.jsonl", "".join(lines).encode())
    summary = {"model": metrics, "question_only_baseline": baseline, "seconds": time.perf_counter() - started}
    run.write_summary(summary)
    return summary


def run_train(cfg: dict[str, Any], out: str | None = None, *, resume: bool = False):
    """Build, train (stage 1, then stage 2 if ``lora_steps``), evaluate; returns the ``Run``. ``resume=True``
    continues the run in ``out`` from its last checkpoint (same options required)."""
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.models.vlm import vlm_from_config
    from potpourri.vlm.train import VLMTrainConfig, encode_samples, instruction_data, train_vlm

    started = time.perf_counter()
    if resume:
        _check_resumable(cfg, out)
    seed_everything(cfg["seed"])
    run = new_run("vlm", out, config=cfg, seed=cfg["seed"])
    state_dir = run.path / "state"
    if resume:
        _trim_metrics(run, state_dir)
    vlm = vlm_from_config(cfg)
    samples, instructions = instruction_data(cfg, "train", cfg["n_train"])
    features = encode_samples(vlm, samples)
    common = dict(batch_size=cfg["batch_size"], seed=cfg["seed"], checkpoint_every=cfg["checkpoint_every"])
    stages = [(1, cfg["steps"], cfg["lr"])] + ([(2, cfg["lora_steps"], cfg["lora_lr"])] if cfg["lora_steps"] else [])
    for stage, steps, lr in stages:
        train_vlm(vlm, features, instructions, VLMTrainConfig(stage=stage, steps=steps, lr=lr, **common), run=run,
                  checkpoint=run.path / "trainable.safetensors", state_dir=state_dir, resume=resume)  # fmt: skip
    _evaluate_and_write(run, vlm, cfg, instructions, started)
    return run


def _check_resumable(cfg: dict[str, Any], out: str | None) -> None:
    """A resumed run needs its folder and the options it was started with."""
    folder = Path(out) if out else None
    if folder is None or not (folder / "config.yaml").is_file():
        raise PotpourriError("--resume needs --out DIR, the folder of a `potpourri vlm train` run to continue")
    from potpourri.vlm.train import saved_stage

    if saved_stage(folder / "state") is None and (folder / "summary.json").is_file():
        raise PotpourriError(f"nothing to resume in '{folder}': the run finished without resumable checkpoints "
                             "(runs before --resume existed); start a new --out")  # fmt: skip
    saved = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    changed = [k for k in cfg if k in saved and saved[k] != cfg[k]]
    if changed:
        key = changed[0]
        raise PotpourriError(f"cannot resume with {key}={cfg[key]!r}: the run used {saved[key]!r}; "
                             "use the same setting or start a new --out")  # fmt: skip


def _trim_metrics(run, state_dir: Path) -> None:
    """Keep the logged rows up to the checkpoint the run resumes from (the rest is trained again)."""
    import csv

    from potpourri.vlm.train import saved_stage

    metrics, stage = run.path / "metrics.csv", saved_stage(state_dir)
    if not metrics.is_file():
        return
    done = json.loads((state_dir / f"stage{stage}" / "last.json").read_text()) if stage else {"stage": 0, "step": 0}
    with open(metrics, newline="") as fh:
        rows = list(csv.DictReader(fh))
    metrics.unlink()
    for row in rows:
        if (int(row["stage"]), int(row["step"])) <= (done["stage"], done["step"]):
            run.log_metrics(row)


def run_eval(run_dir: str | Path, *, n_test: int | None = None, task_identifiers: bool | None = None):
    """Score a trained run again (optionally on more test images or with identifiers switched)."""
    from potpourri.core.runs import Run
    from potpourri.models.vlm import vlm_from_config
    from potpourri.vlm.train import instruction_data

    folder = Path(run_dir)
    if not (folder / "config.yaml").is_file() or not (folder / "trainable.safetensors").is_file():
        raise PotpourriError(f"'{folder}' is not a `potpourri vlm train` run (config.yaml + trainable.safetensors)")
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    if n_test is not None:
        cfg["n_test"] = n_test
    if task_identifiers is not None:
        cfg["task_identifiers"] = task_identifiers
    started = time.perf_counter()
    vlm = vlm_from_config(cfg)
    vlm.load_trainable(folder / "trainable.safetensors")
    _, train_instructions = instruction_data(cfg, "train", cfg["n_train"])
    out = folder / "eval"
    out.mkdir(exist_ok=True)
    return _evaluate_and_write(Run(out), vlm, cfg, train_instructions, started)


def run_baseline(cfg: dict[str, Any], out: str | None = None):
    """Fit the non-LLM baseline on the training images, answer the test instructions; returns the ``Run``."""
    from potpourri.core.io import atomic_write_bytes
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.papers.vlm_baseline import BaselineConfig, InspectionBaseline
    from potpourri.vlm.train import instruction_data, score, trivial_predictions

    started = time.perf_counter()
    seed_everything(cfg["seed"])
    run = new_run("vlm", out, config=cfg, seed=cfg["seed"])
    samples, instructions = instruction_data(cfg, "train", cfg["n_train"])
    test_samples, test_instructions = instruction_data(cfg, "test", cfg["n_test"], offset_seed=1)
    baseline = InspectionBaseline(BaselineConfig(
        encoder=cfg["encoder"], pretrained=cfg["pretrained"], seg_size=cfg["seg_size"], seg_steps=cfg["seg_steps"],
        min_pixels=cfg["min_pixels"], seed=cfg["seed"],
    )).fit(samples)  # fmt: skip
    predictions = {source: baseline.predict(test_samples, test_instructions, answers=source)
                   for source in ("classifier", "segmenter")}  # fmt: skip
    lines = [
        json.dumps({"kind": i.kind, "prompt": i.prompt, "answer": i.answer, "classifier": a, "segmenter": b}) + "\n"
        for i, a, b in zip(test_instructions, predictions["classifier"], predictions["segmenter"], strict=True)
    ]
    atomic_write_bytes(run.path / "predictions.jsonl", "".join(lines).encode())
    summary = {
        "model": score(test_instructions, predictions["classifier"]),
        "segmenter_answers": score(test_instructions, predictions["segmenter"]),
        "question_only_baseline": score(test_instructions, trivial_predictions(instructions, test_instructions)),
        "fit_seconds": baseline.seconds,
        "seconds": time.perf_counter() - started,
    }
    run.write_summary(summary)
    return run


def _print_summary(summary: dict[str, Any]) -> None:
    model, base = summary["model"], summary["question_only_baseline"]
    names = [k for k in model if not k.startswith("n_")]
    print(f"{'metric':<18} {'model':>8} {'baseline':>9}   n")
    for name in names:
        n = model.get(f"n_{name.split('_')[0]}", "")
        print(f"{name:<18} {model[name]:>8.3f} {base.get(name, float('nan')):>9.3f}   {n}")
    print(f"seconds: {summary['seconds']:.0f}")


def _cmd_train(args: argparse.Namespace) -> int:
    from potpourri.vlm.train import parse_kinds

    if args.threads:
        torch.set_num_threads(args.threads)
    resume = args.resume
    cfg = {k: v for k, v in vars(args).items() if k not in ("func", "out", "threads", "vlm_command", "resume")}
    cfg["kinds"] = ",".join(parse_kinds(cfg["kinds"]))
    run = run_train(cfg, args.out, resume=resume)
    _print_summary(run.read_summary())
    print(f"run: {run.path}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    ids = None if args.task_ids is None else args.task_ids == "on"
    _print_summary(run_eval(args.run, n_test=args.n_test, task_identifiers=ids))
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from potpourri.vlm.train import parse_kinds

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = {k: v for k, v in vars(args).items() if k not in ("func", "out", "threads", "vlm_command")}
    cfg["kinds"] = ",".join(parse_kinds(cfg["kinds"]))
    run = run_baseline(cfg, args.out)
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
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--categories", type=lambda s: s.split(","), default=["brick"])
    parser.add_argument("--n-train", type=int, default=140, help="train images per category (kinds cycle)")
    parser.add_argument("--n-test", type=int, default=70, help="test images per category")
    parser.add_argument("--kinds", default=_DEFAULT_KINDS, help="instruction kinds, comma-separated")
    parser.add_argument("--no-task-ids", dest="task_identifiers", action="store_false", help="drop [task] (ablation)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``potpourri vlm train|eval|baseline``."""
    vlm = subparsers.add_parser("vlm", help="MiniGPT-v2-style VLM on DS-Synth: train | eval | baseline")
    verbs = vlm.add_subparsers(dest="vlm_command", required=True)
    train = verbs.add_parser("train", help="train the projection (stage 1), optionally LoRA (stage 2), then evaluate")
    train.add_argument("--lm", default="smollm2_135m", help="smollm2_135m | tiny (random, tests) | a HF model folder")
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
    train.add_argument("--steps", type=int, default=200, help="stage-1 (projection) steps")
    train.add_argument("--lora-steps", type=int, default=0, help="stage-2 (projection + LoRA) steps afterwards")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--lora-lr", type=float, default=2e-4)
    train.add_argument("--lora-rank", type=int, default=8)
    train.add_argument("--lora-alpha", type=float, default=16.0)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--max-new-tokens", type=int, default=0, help="0: 24, or 64 with caption/grounding kinds")
    train.add_argument("--checkpoint-every", type=int, default=50)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    train.add_argument("--out", default=None, help="run folder (default runs/vlm/v<N>)")
    train.set_defaults(func=_cmd_train)
    evaluate = verbs.add_parser("eval", help="score a trained run on the test split again")
    flags.add_run(evaluate, "written by `potpourri vlm train`")
    evaluate.add_argument("--n-test", type=int, default=None)
    evaluate.add_argument("--task-ids", choices=("on", "off"), default=None, help="override the run's identifiers")
    evaluate.add_argument("--threads", type=int, default=0)
    evaluate.set_defaults(func=_cmd_eval)
    base = verbs.add_parser("baseline", help="non-LLM baseline: segmenter boxes + defect-classifier answers, scored")
    _add_data_arguments(base)
    base.add_argument("--seg-size", type=int, default=128, help="segmenter working resolution")
    base.add_argument("--seg-steps", type=int, default=200, help="segmenter training steps (frozen encoder)")
    base.add_argument("--min-pixels", type=int, default=4, help="drop mask components smaller than this")
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    base.add_argument("--out", default=None, help="run folder (default runs/vlm/v<N>)")
    base.set_defaults(func=_cmd_baseline)
