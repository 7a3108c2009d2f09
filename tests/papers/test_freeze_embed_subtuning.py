"""The freeze-embed reproduction: the table is the seeds' statistics, deltas are against SGD, every run is logged."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import pytest

from potpourri.papers.freeze_embed import ARMS, FreezeEmbedConfig, reproduce_freeze_embed, summarise

pytestmark = pytest.mark.one_thread  # moved out of a one-thread folder: keep its thread count (tests/conftest.py)


def test_summarise_on_planted_numbers() -> None:
    runs = [
        {"arm": "sgd", "lr": 0.01, "id_acc": 0.5, "ood_acc": 0.3},
        {"arm": "sgd", "lr": 0.01, "id_acc": 0.7, "ood_acc": 0.5},
        {"arm": "adamw", "lr": 1e-4, "id_acc": 0.8, "ood_acc": 0.2},
        {"arm": "adamw", "lr": 1e-4, "id_acc": 0.6, "ood_acc": 0.2},
    ]
    table = {row["arm"]: row for row in summarise(runs)}
    assert table["sgd"]["id_mean"] == pytest.approx(0.6) and table["sgd"]["id_std"] == pytest.approx(0.1414, abs=1e-4)
    assert table["adamw"]["id_delta"] == pytest.approx(0.1) and table["adamw"]["ood_delta"] == pytest.approx(-0.2)
    assert table["sgd"]["id_delta"] == 0.0


@pytest.mark.slow
def test_quick_reproduction_end_to_end(tmp_path: Path) -> None:
    cfg = FreezeEmbedConfig(
        categories=("brick",),
        n_per_class=2,
        image_size=32,
        epochs=1,
        seeds=(0, 1),
        lrs={arm: (1e-2, 3e-2) if arm.startswith("sgd") else (1e-4,) for arm in ARMS},
        corruptions=("gaussian_noise", "contrast"),
    )
    run = reproduce_freeze_embed(cfg, out=tmp_path / "run")
    with open(run.path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    sweep = [r for r in rows if r["phase"] == "sweep"]
    final = [r for r in rows if r["phase"] == "final"]
    assert len(sweep) == sum(len(v) for v in cfg.lrs.values()) and len(final) == len(ARMS) * len(cfg.seeds)
    summary = run.read_summary()
    for row in summary["table"]:
        ids = [float(r["id_acc"]) for r in final if r["arm"] == row["arm"]]
        assert row["id_mean"] == pytest.approx(statistics.fmean(ids))
        best = max((float(r["val_acc"]), -float(r["lr"])) for r in sweep if r["arm"] == row["arm"])
        assert row["lr"] == pytest.approx(-best[1])  # the lr with the best validation accuracy was kept
    assert (run.path / "results.md").read_text().startswith("| arm |")


@pytest.mark.slow
def test_quick_subtuning_reproduction_and_its_resume(tmp_path: Path) -> None:
    from potpourri.papers.subtuning import SUBTUNING_ARMS, SubTuningConfig, reproduce_subtuning

    cfg = SubTuningConfig(
        categories=("brick",),
        sizes=(2,),
        native_sizes=(2,),
        test_per_class=1,
        image_size=32,
        native_resolution=40,
        epochs=1,
        min_steps=1,
        seeds=(0, 1),
        candidates=("blocks.5.3", "blocks.6.0"),
        max_blocks=1,
        select_epochs=1,
    )
    run = reproduce_subtuning(cfg, out=tmp_path / "run")
    summary = run.read_summary()
    assert [(r["image_size"], r["arm"]) for r in summary["table"]] == [
        (px, arm) for px in (32, 40) for arm in SUBTUNING_ARMS
    ]
    for row in summary["table"]:
        accs = [
            r["test_acc"] for r in summary["runs"] if (r["arm"], r["image_size"]) == (row["arm"], row["image_size"])
        ]
        assert row["acc_mean"] == pytest.approx(statistics.fmean(accs)) and len(accs) == 2
    params = {r["arm"]: r["trainable_params"] for r in summary["table"]}
    assert params["linear"] < params["lora"] < params["full-adamw"]
    assert params["linear"] < params["subtuning (greedy)"] < params["subtuning (last 2)"] < params["full-adamw"]
    assert summary["table"][1]["blocks"] == "blocks.5.3+blocks.6.0"
    assert summary["table"][3]["blocks"] in cfg.candidates  # the greedy search picked one of the offered blocks
    assert len(summary["verdicts"]) == 2 and all("separated from" in v for v in summary["verdicts"])

    # a killed job: drop the last three finished runs (and cut a line in half); the re-run redoes only those
    lines = (run.path / "runs.jsonl").read_text().splitlines()
    (run.path / "runs.jsonl").write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:20])
    again = reproduce_subtuning(cfg, out=tmp_path / "run").read_summary()
    assert [r["test_acc"] for r in again["runs"]] == [r["test_acc"] for r in summary["runs"]]
    with open(run.path / "metrics.csv") as fh:  # the resumed runs and the redone ones
        assert len(list(csv.DictReader(fh))) == len(summary["runs"])
    timeless = [{k: v for k, v in r.items() if k != "train_s_mean"} for r in summary["table"]]
    assert [{k: v for k, v in r.items() if k != "train_s_mean"} for r in again["table"]] == timeless


def test_two_std_rule_on_planted_arms() -> None:
    from potpourri.papers.subtuning import separated

    a = {"acc_mean": 0.80, "acc_std": 0.02}
    assert separated(a, {"acc_mean": 0.75, "acc_std": 0.01})  # 0.05 > 2 x 0.02
    assert not separated(a, {"acc_mean": 0.77, "acc_std": 0.01})  # 0.03 < 0.04
    assert not separated(a, {"acc_mean": 0.70, "acc_std": 0.06})  # the larger std decides: 0.10 < 0.12
