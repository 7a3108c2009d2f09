"""The tuning pipelines behind ``potpourri tune``, ``select-layers`` and ``merge-tasks``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from potpourri.core.errors import PotpourriError
from potpourri.core.runs import Run
from potpourri.tune.data import model_and_data


def tune_run(
    *,
    blocks_spec: str | None,
    data: str,
    image_size: int | None,
    model_name: str,
    momentum: float | None,
    out: str | None,
    pretrained: bool,
    resume: bool,
    seed: int,
    strategy: str,
    threads: int | None,
    workers: int,
    training: dict[str, Any],
    cli_config: dict[str, Any] | None = None,
) -> Run:
    """``potpourri tune``: adapt ``model_name`` to ``data`` with one strategy (``training``: epochs, lr, ...); the run
    holds checkpoints, metrics, the tuned weights, ``metadata.json`` and a ``config.yaml`` that ``--config`` takes
    back (``cli_config``: the verb's arguments)."""
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.models.blocks import block_map, check_blocks
    from potpourri.tune.strategies import get_strategy
    from potpourri.tune.trainer import fit

    if resume and not out:
        raise PotpourriError("--resume needs --out DIR, the folder of the run to continue")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not out:
        raise PotpourriError("under torchrun pass --out DIR, so that every process uses the same run folder")
    seed_everything(seed)
    model, train, val, classes = model_and_data(
        model_name,
        data,
        image_size=image_size,
        pretrained=pretrained,
        seed=seed,
        strategy=strategy,
        workers=workers,
        threads=threads,
    )
    strategy_kwargs: dict[str, Any] = {}
    if momentum is not None:
        strategy_kwargs["momentum"] = momentum
    blocks = [b for b in blocks_spec.split(",") if b] if blocks_spec else None
    get_strategy(strategy, **strategy_kwargs)  # bad names fail before a run folder exists
    if blocks:  # wrapped models (Siamese, visual prompt) name their own blocks
        check_blocks(blocks, model.block_map() if hasattr(model, "block_map") else block_map(model))
    run = new_run("tune", out)
    result = fit(
        model,
        train,
        val,
        strategy,
        blocks=blocks,
        strategy_kwargs=strategy_kwargs,
        out=run.path,
        resume=resume,
        **training,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        if cli_config is not None:  # the loop's settings plus the verb's own arguments, under their flag names
            import yaml

            recorded = yaml.safe_load((run.path / "config.yaml").read_text()) or {}
            run.write_config({**recorded, **cli_config})
        _write_reloadable(run, result.model, model_name=model_name, classes=classes, image_size=image_size,
                          strategy=strategy)  # fmt: skip
    plan = result.plan
    print(
        f"{strategy}: {plan['trainable_params']:,} of {plan['total_params']:,} params trained "
        f"({plan['trainable_pct']:.2f}%), classes {classes}"
    )
    print(f"val_acc {result.final.get('val_acc', float('nan')):.4f}  ({result.seconds:.1f} s)")
    print(f"run: {run.path}")
    return run


def _write_reloadable(
    run: Run, model: torch.nn.Module, *, model_name: str, classes: list[str], image_size: int | None, strategy: str
) -> None:
    """``model.safetensors`` under the plain model's keys (LoRA merged) and the ``metadata.json`` that
    ``potpourri predict --run`` / ``export --run`` rebuild the model from."""
    from potpourri.core.io import save_state_dict_atomic
    from potpourri.tune.data import input_spec, prompt_width
    from potpourri.tune.predict import plain_state_dict, write_classifier_metadata

    size, mean, std = input_spec(model_name, image_size, strategy)
    if strategy == "lora":  # the adapters stay in the checkpoints; the run's model is the merged plain model
        save_state_dict_atomic(plain_state_dict(model), run.path / "model.safetensors")
    builder = {"name": "visual-prompt", "width": prompt_width(size)} if strategy == "visual-prompt" else None
    if strategy == "siamese-subtuning":
        builder = {"name": "siamese-subtuning"}
    write_classifier_metadata(
        run.path, model_name=model_name, classes=classes, image_size=size, mean=mean, std=std, strategy=strategy,
        builder=builder,
    )  # fmt: skip


def select_layers_run(
    *,
    candidates_spec: str | None,
    data: str,
    epsilon: float,
    folds: int,
    image_size: int | None,
    max_blocks: int,
    max_params: float | None,
    model_name: str,
    out: str | None,
    pretrained: bool,
    proxy: str,
    proxy_only: bool,
    seed: int,
    threads: int | None,
    time_budget: float | None,
    workers: int,
    training: dict[str, Any],
    run_config: dict[str, Any],
) -> Run:
    """``potpourri select-layers``: proxy scores and/or greedy k-fold selection of the blocks to fine-tune."""
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.tune.layer_select import greedy_select, proxy_scores

    seed_everything(seed)
    model, train, _, _ = model_and_data(
        model_name,
        data,
        image_size=image_size,
        pretrained=pretrained,
        seed=seed,
        strategy=None,
        workers=workers,
        threads=threads,
    )
    run = new_run("select-layers", out)
    run.write_config(run_config)
    summary: dict[str, Any] = {}
    if proxy != "none":
        scores = proxy_scores(model, train, method=proxy)
        ranking = sorted((e for e in scores if e != "head"), key=scores.get, reverse=True)
        summary["proxy"] = {"method": proxy, "scores": scores, "ranking": ranking}
        print(f"{proxy} ranking: {', '.join(ranking[:8])}{' …' if len(ranking) > 8 else ''}")
    if not proxy_only:
        candidates = [b for b in candidates_spec.split(",") if b] if candidates_spec else None
        selection = greedy_select(
            model,
            train,
            candidates=candidates,
            folds=folds,
            epsilon=epsilon,
            max_blocks=max_blocks,
            max_params=max_params,
            time_budget_s=time_budget,
            **{**training, "progress": False},
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
    return run


def merge_tasks_run(*, image_size: int | None, model: str, out: str | None, run_specs: list[str]) -> Run:
    """Build the shared model, check it reproduces every run's outputs, report compute and memory saved."""
    from potpourri.core.registry import count_macs, create_model
    from potpourri.core.runs import new_run
    from potpourri.tune.multitask import MultiTaskModel, load_task_model

    runs = dict(spec.split("=", 1) if "=" in spec else (Path(spec).name, spec) for spec in run_specs)
    backbone = create_model(model, pretrained=True).eval()
    tasks = {name: load_task_model(backbone, path) for name, path in runs.items()}
    shared = MultiTaskModel(backbone, tasks)
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = shared(x)
        worst = max((outputs[n] - m.eval()(x)).abs().max().item() for n, (m, _) in tasks.items())
    shape = (1, 3, image_size, image_size)
    macs = {"shared": count_macs(shared, shape), "separate": sum(count_macs(m, shape) for m, _ in tasks.values())}
    params = {"shared": shared.parameter_counts()["total"]}
    params["separate"] = sum(sum(p.numel() for p in m.parameters()) for m, _ in tasks.values())
    run = new_run("merge-tasks", out)
    run.write_config({"runs": runs, "model": model, "img_size": image_size})
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
    return run
