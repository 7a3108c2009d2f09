"""The ``--quick`` runs of four reproductions that had no test beyond their signature: each writes results.md and
summary.json, and a property that must hold whatever the numbers (a formula or an invariant) holds."""

from __future__ import annotations

import json

import pytest

from potpourri.papers.registry import run_experiment

pytestmark = [pytest.mark.slow, pytest.mark.one_thread]


def _quick(name: str, tmp_path) -> tuple[str, dict]:
    run = run_experiment(name, quick=True, out=str(tmp_path / name))
    return (run.path / "results.md").read_text(), json.loads((run.path / "summary.json").read_text())


def test_autovp_quick_keeps_the_source_model_frozen(tmp_path) -> None:
    results, summary = _quick("autovp", tmp_path)
    assert "| method | epochs | train acc | val acc | test acc | trainable params |" in results
    assert summary["source_bit_identical"] is True  # AutoVP trains the prompt and the mapping only
    assert summary["best"]["mapping"] in {"freq", "iter", "semantic", "fully"}


def test_opro_quick_accounts_for_every_proposal(tmp_path) -> None:
    results, summary = _quick("opro", tmp_path)
    assert "opro-smollm2" in results and "random" in results
    for row in summary["rows"]:
        assert row["evaluations"] + row["invalid"] + row["duplicates"] == row["proposals"]
        assert 0.0 <= row["val_acc"] <= 1.0 and 0.0 <= row["test_acc"] <= 1.0
    random_rows = [r for r in summary["rows"] if r["arm"] == "random"]
    assert random_rows and all(r["invalid"] == 0 for r in random_rows)  # random proposals are always well-formed


def test_all_seeing_quick_chance_follows_the_gallery_size(tmp_path) -> None:
    results, summary = _quick("all-seeing", tmp_path)
    assert "| region tokens | top-1 | top-5 |" in results
    gallery = summary["gallery"]
    assert summary["chance"]["top1"] == pytest.approx(1 / gallery)
    assert summary["chance"]["top5"] == pytest.approx(min(5, gallery) / gallery)


def test_simdetr_quick_recall_grows_with_the_number_of_proposals(tmp_path) -> None:
    results, summary = _quick("simdetr", tmp_path)
    assert "withdrawn from ICLR 2024" in results
    for key in ("recall_lite0 features", "recall_pixels (RGB)"):
        recalls = [summary[key][k] for k in sorted(summary[key], key=int)]  # top-1, top-3, top-10, top-20
        assert all(0.0 <= r <= 1.0 for r in recalls) and recalls == sorted(recalls)


def test_clip_small_quick_reloads_exactly_and_reports_exact_chance(tmp_path) -> None:
    results, summary = _quick("clip-small", tmp_path)
    assert "held-out" in results and "zero-shot" in results and "moon, tissue" in results
    assert set(summary["verdict"]) == {"zero_shot_above_chance", "i2t_above_chance", "t2i_above_chance",
                                       "chosen_text_arm"}  # fmt: skip
    for arm in summary["arms"].values():
        assert arm["reload_max_diff"] == 0.0  # the saved model embeds exactly as the trained one
        for split in ("held_out", "seen"):
            r = arm["scores"][split]["retrieval"]
            assert r["i2t_r1_chance"] == pytest.approx(1 / r["gallery"])
            assert r["i2t_r1_chance"] <= r["i2t_r5_chance"] <= 1.0 and r["t2i_r1_chance"] <= r["t2i_r5_chance"]
    config = json.loads((tmp_path / "clip-small" / "text-tuned-0" / "config.json").read_text())
    assert config["trained_on"] == ["brick", "grass", "gravel"] and config["held_out"] == ["moon", "tissue"]


def test_anomalyclip_quick_keeps_the_global_path_and_the_towers_untouched(tmp_path) -> None:
    results, summary = _quick("anomalyclip", tmp_path)
    assert "zero-shot" in results and "PatchCore (Lite0), 1 normal image(s)" in results
    checks = summary["checks"]
    assert checks["dpam_global_max_diff"] == 0.0  # DPAM's global embedding is the model's own image embedding
    assert checks["dpam_clip_unchanged"] and checks["plain_clip_unchanged"]  # only the prompts train
    assert {r["method"] for r in summary["rows"]} >= {"AnomalyCLIP (learned prompts, DPAM)",
                                                      "WinCLIP-style (hand-written prompts)"}  # fmt: skip
    assert all(0.0 <= r["image_auroc"] <= 1.0 and 0.0 <= r["pixel_auroc"] <= 1.0 for r in summary["rows"])
    assert set(summary["verdict"]) >= {"learned_beats_handwritten_image_auroc", "dpam_beats_plain_pixel_auroc"}


def test_yolov6_v3_quick_reports_every_arm_and_deploys_aat_as_the_baseline(tmp_path) -> None:
    from potpourri.papers.yolov6_v3 import ARMS

    results, summary = _quick("yolov6-v3", tmp_path)
    assert "| arm | test mAP@0.5 | test mAP@0.5:0.95 | train CPU s | train wall s |" in results
    assert set(summary["arms"]) == set(ARMS) and set(summary["verdict"]) == set(ARMS) - {"baseline"}
    for row in summary["arms"].values():
        assert {"map50", "map", "train_seconds", "train_cpu_seconds", "deployed_params", "latency_ms"} <= set(row)
        assert all(c > 0 for c in row["train_cpu_seconds"])  # the process did spend CPU on each training run
        assert all(0.0 <= v <= 1.0 for v in row["map50"] + row["map"]) and max(row["reparam_max_abs_diff"]) <= 1e-3
    backends = {r["backend"] for r in summary["latency_rows"]}
    assert {r["model"] for r in summary["latency_rows"]} == set(ARMS)
    assert "eager" in backends and ("onnxruntime" in backends or summary["latency_conditions"]["not_installed"])
    assert summary["aat_deploys_the_baseline_graph"] is True  # the anchor branch is gone after re-parameterisation
    assert summary["arms"]["+AAT"]["train_params"] > summary["arms"]["+AAT"]["deployed_params"]


def test_reproduce_seed_reaches_the_experiment_and_is_refused_where_seeds_are_fixed(tmp_path, monkeypatch) -> None:
    from potpourri.papers.registry import EXPERIMENTS, SEEDED, takes_seed
    from tests.inprocess import run_main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: refused before anything is written
    under_torchrun = run_main("reproduce", "v2l", "--quick", "--out", str(tmp_path / "tr"))
    monkeypatch.delenv("WORLD_SIZE")
    assert under_torchrun.returncode == 2 and "one process" in under_torchrun.stderr and not (tmp_path / "tr").exists()
    refused = run_main("reproduce", "freeze-embed", "--quick", "--seed", "1", "--out", str(tmp_path / "fe"))
    assert refused.returncode == 2 and "fixes its own seeds" in refused.stderr
    assert not (tmp_path / "fe").exists()  # nothing written
    assert {name for name in EXPERIMENTS if takes_seed(name)} == set(SEEDED)  # the help's list is the truth
    runs = {s: run_experiment("clip-small", quick=True, out=str(tmp_path / f"clip{s}"), seed=s) for s in (0, 3)}
    configs = {s: json.loads((r.path / "summary.json").read_text())["config"] for s, r in runs.items()}
    assert configs[0]["train"]["seed"] == 0 and configs[3]["train"]["seed"] == 3
    rest = [{k: v for k, v in c.items() if k != "train"} for c in configs.values()]
    assert rest[0] == rest[1]
    missing = run_main("reproduce", "anomalyclip", "--seed", "7", "--out", str(tmp_path / "ac"), cwd=tmp_path)
    assert missing.returncode == 2 and "clip-small --seed 7 --out runs/clip-small-seed7" in missing.stderr
    assert not (tmp_path / "ac").exists()
