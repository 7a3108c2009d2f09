"""The deployment pipelines behind ``potpourri export``, ``bench`` and ``auto-replace``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from potpourri.core.errors import PotpourriError
from potpourri.core.runs import Run
from potpourri.deploy.runs import run_kind


def export_run(
    *,
    export_format: str,
    image_size: int | None,
    model_name: str | None,
    out: str | None,
    pretrained: bool,
    reparam: bool,
    weights: str | None,
    run_config: dict[str, Any],
    run: str | None = None,
) -> Run:
    """``potpourri export``: ONNX export of a registered model or a tune ``run`` (its classes, weights, input size
    and normalisation) with a parity check and metadata.json."""
    from potpourri.core.registry import create_model, get_pretrained_cfg
    from potpourri.core.runs import new_run
    from potpourri.deploy.export import export_onnx, result_dict
    from potpourri.tune.predict import class_names

    if export_format != "onnx":
        raise PotpourriError(f"unknown export format '{export_format}'; choose onnx")
    if run is not None and run_kind(run) == "inspection":
        return _export_inspection(run, out, run_config)
    if run is not None:
        from potpourri.tune.predict import load_classifier

        if weights is not None or pretrained or image_size is not None:
            raise PotpourriError("--weights, --pretrained and --image-size do not apply with --run: the run's are used")
        classifier = load_classifier(run)
        model, cfg, names, name = classifier.model, classifier.cfg, classifier.classes, Path(run).resolve().name
        input_size = tuple(cfg.input_size)
    else:
        cfg = get_pretrained_cfg(model_name)
        model = create_model(model_name, pretrained=pretrained, weights=weights)
        size = image_size or (cfg.input_size[-1] if cfg else 224)
        input_size = (3, size, size)
        names = class_names(cfg.label_set, model.num_classes) if cfg and getattr(model, "num_classes", 0) else None
        name = model_name
    out_run = new_run("export", out, config=run_config)
    result = export_onnx(
        model, out_run.path, input_size=input_size, cfg=cfg, class_names=names, reparam=reparam, name=name
    )
    out_run.write_summary(result_dict(result))
    print(f"{result.onnx_path} (ONNX Runtime max |diff| {result.max_abs_diff:.2e}); metadata: {result.metadata_path}")
    return out_run


def _export_inspection(run: str, out: str | None, run_config: dict[str, Any]) -> Run:
    """``export --run`` of an ``inspect fit`` run: the torch-free bundle, parity-checked on up to 8 of the run's
    own test images (else training images)."""
    import yaml

    from potpourri.core.runs import new_run
    from potpourri.data.folders import read_folder
    from potpourri.deploy.inspect_export import export_patchcore

    data = yaml.safe_load((Path(run) / "config.yaml").read_text()).get("data")
    if not data:
        raise PotpourriError(f"'{run}' records no data to check the export on; refit it with this potpourri")
    folder = read_folder(data)
    images = list(folder.test or folder.train)[:8]
    out_run = new_run("export", out, config=run_config)
    meta = export_patchcore(run, out_run.path / "bundle", check_images=images)
    out_run.write_summary({"bundle": str(out_run.path / "bundle"), "parity": meta["parity"]})
    for backend in ("onnxruntime", "openvino"):
        if backend in meta["parity"]:
            p = meta["parity"][backend]
            print(f"{backend}: score rel diff {p['score_rel_diff']:.1e}, map rel diff {p['map_rel_diff']:.1e}, "
                  f"same verdicts {p['same_verdicts']}")  # fmt: skip
    print(f"bundle: {out_run.path / 'bundle'} (patchcore.onnx, metadata.json, inspect_runtime.py)")
    return out_run


def bench_run(
    *,
    backend: list[str],
    batch: list[int],
    image_size: int | None,
    models: list[str],
    out: str | None,
    reparam: bool,
    rounds: int,
    threads: int | None,
    run_config: dict[str, Any],
    roofline: bool = False,
    per_layer: int = 0,
    allocator: str = "retain",
) -> Run:
    """``potpourri bench``: interleaved latency of ``models`` per backend and batch; a Markdown table. With
    ``roofline``, this machine's peaks and each model's FLOPs, bytes and achieved fraction of its roofline bound;
    ``per_layer`` > 0 adds that many top layers for each model under 60 % of its bound."""
    from potpourri.core.runs import new_run
    from potpourri.deploy.latency import bench_models, build_candidates, latency_table
    from potpourri.report.html import Report

    built = build_candidates(models, reparam=reparam)
    rows, conditions = bench_models(
        list(built),
        models=built,
        batches=batch,
        threads=threads,
        backends=backend,
        image_size=image_size,
        rounds=rounds,
        allocator=allocator,
    )
    peaks = None
    if roofline:
        from potpourri.deploy.roofline import measure_peaks

        peaks = measure_peaks(threads)  # after the latencies, so their settings are validated first
    run = new_run("bench", out, config=run_config)
    for row in rows:
        run.log_metrics(asdict(row))
    table = latency_table(rows, reference=models[0])
    table += "".join(f"\n{b}: {why}" for b, why in conditions["not_installed"].items())
    summary: dict[str, Any] = {"rows": [asdict(r) for r in rows], "conditions": conditions}
    report = Report("potpourri bench")
    report.section("Latency", f"Speed-up column: against {models[0]} with the same backend and batch.")
    report.table([asdict(r) for r in rows])
    if peaks is not None:
        from potpourri.deploy.roofline import roofline_report

        roof = roofline_report(
            built,
            rows,
            peaks,
            image_size=image_size,
            not_installed=conditions["not_installed"],
            per_layer_top=per_layer,
            rounds=rounds,
        )
        table += "\n\n" + roof.text()
        summary |= {"peaks": asdict(peaks), "roofline": roof.rows, "per_layer": roof.per_layer}
        report.section("Roofline", roof.text().split("\n", 1)[0])
        report.table(roof.rows)
        for title, per_layer_md in roof.per_layer.items():
            report.section(title)
            report.code(per_layer_md)
    (run.path / "results.md").write_text(table + "\n")
    run.write_summary(summary)
    report.text(f"Conditions: {conditions}", note=True)
    report.write(run.path / "report.html")
    print(table)
    print(f"load average before/after: {conditions['loadavg_before'][0]:.2f}/{conditions['loadavg_after'][0]:.2f}")
    print(f"run: {run.path}")
    return run


def auto_replace_run(
    *,
    budget_ms: float,
    global_steps: int,
    image_size: int | None,
    n_images: int,
    model_name: str,
    out: str | None,
    pretrained: bool,
    rounds: int,
    seed: int,
    speedup: float,
    steps: int,
    threads: int | None,
    weights: str | None,
    run_config: dict[str, Any],
) -> Run:
    """``potpourri auto-replace``: FC->Conv rewrite, then distilled cheaper sub-blocks under a latency budget."""
    import torch

    from potpourri.core.registry import create_model
    from potpourri.core.runs import new_run, seed_everything
    from potpourri.data.synth import make_task
    from potpourri.deploy.auto_replace import auto_replace, mlp_to_conv
    from potpourri.report.html import Report

    seed_everything(seed)
    torch.set_num_threads(threads)
    model = create_model(model_name, pretrained=pretrained, weights=weights, img_size=image_size)
    task = make_task("classification", n_per_class=max(1, n_images // 21 + 1), size=image_size, seed=seed)
    images = (torch.from_numpy(task.train_images).permute(0, 3, 1, 2).float() / 127.5 - 1.0)[:n_images]
    images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))]
    run = new_run("auto-replace", out, config=run_config, seed=seed)
    _, exact_diff = mlp_to_conv(model, images[:2])
    plan = auto_replace(
        model,
        images,
        budget_ms=budget_ms,
        speedup=speedup,
        steps=steps,
        rounds=rounds,
        seed=seed,
        global_steps=global_steps,
    )
    for row in plan.rows:
        run.log_metrics(row)
    summary = {
        "teacher_ms": plan.teacher_ms,
        "student_ms": plan.student_ms,
        "speedup": plan.teacher_ms / plan.student_ms,
        "agreement": plan.agreement,
        "output_rel_error": plan.output_rel_error,
        "exact_fc_to_conv_max_abs_diff": exact_diff,
        "sites": plan.rows,
    }
    run.write_summary(summary)
    report = Report(f"potpourri auto-replace — {model_name}")
    report.section("Chosen replacements", "Local loss: held-out MSE / target variance of the site's output.")
    report.table(plan.rows)
    report.table(
        [{"model": "teacher", "batch-1 ms": plan.teacher_ms}, {"model": "student", "batch-1 ms": plan.student_ms}]
    )
    report.text(
        f"Top-1 agreement with the teacher on held-out images: {plan.agreement:.3f}; relative output error "
        f"{plan.output_rel_error:.3f}. Exact FC→1×1-conv "
        f"rewrite of every MLP: max |diff| {exact_diff:.2e}."
    )
    report.write(run.path / "report.html")
    for row in plan.rows:
        print(f"{row['site']:<16} {row['chosen']:<18} loss {row['local_loss']:.3f}  saved {row['saved_ms']:.2f} ms")
    print(
        f"batch-1 latency {plan.teacher_ms:.2f} → {plan.student_ms:.2f} ms "
        f"({plan.teacher_ms / plan.student_ms:.2f}x), agreement {plan.agreement:.3f}, "
        f"relative output error {plan.output_rel_error:.3f}; run: {run.path}"
    )
    return run
