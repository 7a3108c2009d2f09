"""The VLM pipelines behind ``potpourri vlm train`` and ``vlm eval``: data, resumable training, evaluation, run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from potpourri.core.errors import PotpourriError

if TYPE_CHECKING:
    from potpourri.core.training import TrainOptions


def _evaluate_and_write(
    run, vlm, cfg: dict[str, Any], train_instructions, started: float, *, device: str = "auto", precision: str = "fp32"
) -> dict[str, Any]:
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
    features = encode_samples(vlm, test_samples, device=device, precision=precision)
    long_answers = {"caption", "grounding", "detection"} & set(parse_kinds(cfg["kinds"]))
    max_new_tokens = cfg.get("max_new_tokens") or (64 if long_answers else 24)
    metrics, predictions = evaluate_vlm(
        vlm, features, test_instructions, max_new_tokens=max_new_tokens, device=device, precision=precision
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


def run_train(
    cfg: dict[str, Any], out: str | None = None, *, resume: bool = False, options: TrainOptions | None = None
):
    """Build, train (stage 1, then stage 2 if ``lora_steps``), evaluate; returns the ``Run``. ``resume=True`` (or
    ``options.resume``) continues the run in ``out`` from its last checkpoint (same options required); ``options``
    (``core.training.TrainOptions``): device, precision, progress, checkpoint cadence (default: every
    ``cfg["checkpoint_every"]`` steps). ``trainable.safetensors`` is written once every stage is trained. Under
    torchrun each process trains on its slice of every batch; rank 0 evaluates and writes (None on the others)."""
    from dataclasses import replace

    from potpourri.core.distributed import process_group
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.core.training import TrainOptions, resolve_device
    from potpourri.models.vlm import vlm_from_config
    from potpourri.vlm.train import VLMTrainConfig, encode_samples, instruction_data, train_vlm

    started = time.perf_counter()
    options = options or TrainOptions(checkpoint_every=cfg["checkpoint_every"])
    options = replace(options, resume=resume or options.resume)
    if options.resume:
        _check_resumable(cfg, out)
    seed_everything(cfg["seed"])

    def open_run():
        run = new_run("vlm", out, config=cfg, seed=cfg["seed"])
        if options.resume:
            _trim_metrics(run, run.path / "state")
        return run

    with process_group(resolve_device(options.device)) as group:  # rank 0 of 1 outside torchrun
        run = group.main_first(open_run)  # under torchrun: rank 0's run folder, checkpoints and rows
        options = replace(options, progress=options.progress and group.is_main)
        vlm = vlm_from_config(cfg)
        samples, instructions = instruction_data(cfg, "train", cfg["n_train"])
        features = encode_samples(vlm, samples, device=options.device)
        common = dict(batch_size=cfg["batch_size"], seed=cfg["seed"], checkpoint_every=cfg["checkpoint_every"])
        stages = [(1, cfg["steps"], cfg["lr"])] + (
            [(2, cfg["lora_steps"], cfg["lora_lr"])] if cfg["lora_steps"] else []
        )
        for stage, steps, lr in stages:
            train_vlm(vlm, features, instructions, VLMTrainConfig(stage=stage, steps=steps, lr=lr, **common), run=run,
                      state_dir=run.path / "state", options=options)  # fmt: skip
    if not group.is_main:  # rank 0 writes the weights, evaluates and writes the run
        return None
    vlm.save_trainable(run.path / "trainable.safetensors")
    _evaluate_and_write(run, vlm, cfg, instructions, started, device=options.device, precision=options.precision)
    return run


def _check_resumable(cfg: dict[str, Any], out: str | None) -> None:
    """A resumed run needs its folder and the options it was started with."""
    folder = Path(out) if out else None
    if folder is None or not (folder / "config.yaml").is_file():
        raise PotpourriError("--resume needs --out DIR, the folder of a `potpourri vlm train` run to continue")
    from potpourri.vlm.train import saved_stage

    stage = saved_stage(folder / "state")
    if stage is None and (folder / "summary.json").is_file():
        raise PotpourriError(f"nothing to resume in '{folder}': the run finished without resumable checkpoints "
                             "(runs before --resume existed); start a new --out")  # fmt: skip
    last = json.loads((folder / "state" / f"stage{stage}" / "last.json").read_text()) if stage is not None else {}
    if stage is not None and "optimizers" not in last:  # the format before core.training.Trainer
        raise PotpourriError(f"the checkpoints in '{folder}' were written by an older potpourri and cannot be resumed; "
                             "start a new --out")  # fmt: skip
    check_same_config(cfg, folder)


def check_same_config(cfg: dict[str, Any], folder: Path) -> None:
    """A resumed run's options must be those in its ``config.yaml``: one clear error naming the first that differs."""
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
    done = {
        "stage": stage or 0,
        "step": json.loads((state_dir / f"stage{stage}" / "last.json").read_text())["step"] if stage else 0,
    }
    with open(metrics, newline="") as fh:
        rows = list(csv.DictReader(fh))
    metrics.unlink()
    for row in rows:
        if (int(row["stage"]), int(row["step"])) <= (done["stage"], done["step"]):
            run.log_metrics(row)


def run_eval(
    run_dir: str | Path,
    *,
    n_test: int | None = None,
    task_identifiers: bool | None = None,
    device: str = "auto",
    precision: str = "fp32",
):
    """Score a trained run again (optionally on more test images or with identifiers switched) on ``device`` in
    ``precision``."""
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
    return _evaluate_and_write(Run(out), vlm, cfg, train_instructions, started, device=device, precision=precision)
