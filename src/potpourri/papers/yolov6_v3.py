"""``potpourri reproduce yolov6-v3``: the YOLOv6 v3 parts, one at a time, on DS-Synth detection.

YOLOv6 v3.0 (Li et al., arXiv 2301.05586) adds to the v2 detector a bi-directional concatenation (BiC) neck, a
SimCSPSPPF block, anchor-aided training (AAT: an anchor-based branch trained alongside the anchor-free head and
removed at inference) and ATSS for the warm-up epochs before TAL. We train ``yolo_rep_n`` from scratch with each
part alone and with all four, over seeds, and report test mAP@0.5 and mAP@0.5:0.95 (pycocotools), training time and
latency after re-parameterisation in eager PyTorch and ONNX Runtime (one thread, batch 1). Verdict per part: its
mean mAP@0.5 against the baseline by the 2-std rule (closer than 2 std of either arm is "within noise").
Reading order: ``ARMS`` → ``reproduce_yolov6_v3`` (train, evaluate, fuse, time) → ``_verdicts``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from potpourri.core.metrics import two_std_apart
from potpourri.core.runs import Run, new_run
from potpourri.core.training import TrainOptions, resolve_device
from potpourri.papers.registry import compute_options
from potpourri.report.tables import markdown_table, mean_std

__all__ = ["ARMS", "YoloV6V3Config", "reproduce_yolov6_v3", "run"]

# arm -> DetectTrainConfig fields it changes; "atss_warmup_epochs": None means "the config's warm-up"
ARMS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "+BiC": {"neck": "bic"},
    "+SimCSPSPPF": {"sppf": "simcspsppf"},
    "+AAT": {"aat": True},
    "+ATSS→TAL": {"atss_warmup_epochs": None},
    "all four": {"neck": "bic", "sppf": "simcspsppf", "aat": True, "atss_warmup_epochs": None},
}


@dataclass
class YoloV6V3Config:
    """Every knob of the ablation."""

    category: str = "brick"
    model: str = "yolo_rep_n"
    image_size: int = 160
    train_per_kind: int = 20  # six defect kinds + "multi"
    test_per_kind: int = 10
    epochs: int = 40
    atss_warmup_epochs: int = 4  # YOLOv6: 4 of 300 epochs; a larger share of our short schedule
    batch_size: int = 16
    lr: float = 2e-3
    seeds: tuple[int, ...] = (0, 1)
    arms: tuple[str, ...] = tuple(ARMS)
    latency_rounds: int = 30
    progress: bool = True


def _arm_config(arm: str, cfg: YoloV6V3Config, seed: int, class_names: tuple[str, ...], options: TrainOptions | None):
    from potpourri.core.errors import PotpourriError
    from potpourri.detect.train import DetectTrainConfig

    if arm not in ARMS:
        raise PotpourriError(f"unknown arm '{arm}'; choose from {', '.join(ARMS)}")
    changes = {k: (cfg.atss_warmup_epochs if v is None else v) for k, v in ARMS[arm].items()}
    return DetectTrainConfig(model=cfg.model, class_names=class_names, image_size=cfg.image_size, epochs=cfg.epochs,
                             batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, progress=cfg.progress, **changes,
                             **compute_options(DetectTrainConfig, options))  # fmt: skip


def _verdicts(arms: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Per part: ``better``/``worse`` when the mean mAP@0.5 differs from the baseline's by more than 2 standard
    deviations of either arm (``core.metrics.two_std_apart``; one seed: std 0, any gain counts), else
    ``within noise``."""

    def std(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    base = arms["baseline"]["map50"]
    verdicts = {}
    for arm, row in arms.items():
        if arm == "baseline":
            continue
        mean, base_mean = statistics.mean(row["map50"]), statistics.mean(base)
        apart = two_std_apart(mean, std(row["map50"]), base_mean, std(base))
        verdicts[arm] = ("better" if mean > base_mean else "worse") if apart else "within noise"
    return verdicts


def reproduce_yolov6_v3(cfg: YoloV6V3Config, *, out: str | None = None, options: TrainOptions | None = None) -> Run:
    """Train every arm × seed, evaluate, re-parameterise and time; writes ``results.md`` and ``summary.json``.

    Example:
        run = reproduce_yolov6_v3(YoloV6V3Config(seeds=(0,))); print((run.path / "results.md").read_text())
    """
    from potpourri.data.boxes import synth_detection_samples
    from potpourri.data.synth import DEFECTS, MULTI
    from potpourri.deploy.latency import bench_models
    from potpourri.detect.train import evaluate_detector, train_detector
    from potpourri.models.reparam import reparameterize

    started = time.perf_counter()
    device = resolve_device((options or TrainOptions()).device)
    if "baseline" not in cfg.arms:
        cfg = YoloV6V3Config(**{**asdict(cfg), "arms": ("baseline", *cfg.arms)})
    run = new_run("reproduce-yolov6-v3", out, config=asdict(cfg), seed=cfg.seeds[0])
    kinds = (*DEFECTS, MULTI)
    train = synth_detection_samples(cfg.category, "train", cfg.train_per_kind * len(kinds), seed=0,
                                    size=cfg.image_size)  # fmt: skip
    test = synth_detection_samples(cfg.category, "test", cfg.test_per_kind * len(kinds), seed=0, size=cfg.image_size)
    class_names = tuple(DEFECTS)
    arms: dict[str, dict[str, Any]] = {}
    deployed: dict[str, torch.nn.Module] = {}
    for arm in cfg.arms:
        row: dict[str, Any] = {"map50": [], "map": [], "train_seconds": [], "train_cpu_seconds": [],
                               "reparam_max_abs_diff": []}  # fmt: skip
        for seed in cfg.seeds:
            train_cfg = _arm_config(arm, cfg, seed, class_names, options)
            cpu_started = time.process_time()  # CPU seconds of this process: fair between arms run under other load
            result = train_detector(train, None, train_cfg, options=options)
            cpu_seconds = time.process_time() - cpu_started
            metrics = evaluate_detector(result.model, test, image_size=cfg.image_size, device=device)
            model = result.model.cpu().eval()
            fused = reparameterize(model)  # a copy without the AAT branch: what ships
            x = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                diff = float((fused(x) - model(x)).abs().max())
            for key, value in (("map50", metrics["map50"]), ("map", metrics["map"]),
                               ("train_seconds", result.seconds), ("train_cpu_seconds", cpu_seconds),
                               ("reparam_max_abs_diff", diff)):  # fmt: skip
                row[key].append(value)
            run.log_metrics({"arm": arm, "seed": seed, "map50": metrics["map50"], "map": metrics["map"],
                             "train_seconds": result.seconds, "train_cpu_seconds": cpu_seconds,
                             "reparam_max_abs_diff": diff})  # fmt: skip
            deployed.setdefault(arm, fused)
        row["train_params"] = sum(p.numel() for p in model.parameters())
        row["deployed_params"] = sum(p.numel() for p in deployed[arm].parameters())
        arms[arm] = row

    latency_rows, conditions = bench_models(list(deployed), backends=("eager", "onnxruntime"), models=deployed,
                                            image_size=cfg.image_size, rounds=cfg.latency_rounds)  # fmt: skip
    for latency in latency_rows:
        arms[latency.model].setdefault("latency_ms", {})[latency.backend] = latency.median_ms
    verdicts = _verdicts(arms)

    lines = [f"# YOLOv6 v3 parts on DS-Synth {cfg.category} detection ({cfg.model}, {cfg.image_size} px)", "",
             f"{len(train)} training and {len(test)} test images; {cfg.epochs} epochs from scratch; seeds "
             f"{list(cfg.seeds)} (mean ± std); ATSS warm-up {cfg.atss_warmup_epochs} epochs. Latency: re-parameterised "
             f"model, batch 1, {conditions['threads']} thread, median of {cfg.latency_rounds} interleaved rounds "
             f"(load {conditions['loadavg_before'][0]:.1f} → {conditions['loadavg_after'][0]:.1f}).", ""]  # fmt: skip
    header = ["arm", "test mAP@0.5", "test mAP@0.5:0.95", "train CPU s", "train wall s", "params train → deployed",
              "eager ms", "ORT ms", "verdict"]  # fmt: skip
    table = []
    for arm, row in arms.items():
        latency = {k: f"{v:.2f}" for k, v in row.get("latency_ms", {}).items()}
        table.append([arm, mean_std(row["map50"]), mean_std(row["map"]), mean_std(row["train_cpu_seconds"], digits=0),
                      f"{statistics.mean(row['train_seconds']):.0f}",
                      f"{row['train_params']:,} → {row['deployed_params']:,}", latency.get("eager", "n/a"),
                      latency.get("onnxruntime", "n/a"), verdicts.get(arm, "reference")])  # fmt: skip
    lines.append(markdown_table(header, table))
    lines += ["", "Train CPU s: this process's CPU seconds per training run (mean ± std over seeds), comparable "
              "between arms when other work shares the machine; train wall s is not."]  # fmt: skip
    if conditions["not_installed"]:
        lines += ["", f"Not timed: {conditions['not_installed']}."]
    same_graph = [a for a in ("+AAT", "+ATSS→TAL") if a in arms]
    lines += ["", f"{', '.join(same_graph) or 'No arm'} deploy the baseline's graph (AAT's branch is deleted by "
              "re-parameterisation; the schedule changes training only), so their latency differs from the "
              "baseline's by timing noise alone."]  # fmt: skip
    total = time.perf_counter() - started
    lines += ["", f"Total {total / 60:.1f} min on {torch.get_num_threads()} thread(s)."]
    summary = {
        "config": asdict(cfg),
        "arms": arms,
        "verdict": verdicts,
        "aat_deploys_the_baseline_graph": "+AAT" in arms
        and arms["+AAT"]["deployed_params"] == arms["baseline"]["deployed_params"],
        "latency_rows": [asdict(r) for r in latency_rows],
        "latency_conditions": conditions,
        "seconds": total,
    }
    (run.path / "results.md").write_text("\n".join(lines) + "\n")
    run.write_summary(summary)
    return run


def run(quick: bool, out: str | None, options: TrainOptions | None = None) -> Run:
    """``potpourri reproduce yolov6-v3``: the full ablation, or a seconds-long smoke run of the same code path."""
    cfg = YoloV6V3Config()
    if quick:  # same code path, numbers not meaningful
        cfg = YoloV6V3Config(image_size=64, train_per_kind=1, test_per_kind=1, epochs=2, atss_warmup_epochs=1,
                             batch_size=7, seeds=(0,), latency_rounds=3, progress=False)  # fmt: skip
    return reproduce_yolov6_v3(cfg, out=out, options=options)
