"""``reproduce mask-frozen-detr``: the quick run reports both frozen arms with one head code path and the two
end-to-end arms stopped at the frozen DETR arm's CPU budget; a re-run on the same folder trains nothing again; a DETR
checkpoint folder of another config is refused rather than resumed."""

from __future__ import annotations

import json

import pytest

from potpourri.core.errors import PotpourriError
from potpourri.papers.mask_frozen_detr import MaskFrozenDetrConfig, reproduce_mask_frozen_detr
from potpourri.papers.registry import run_experiment


@pytest.mark.slow
@pytest.mark.one_thread
def test_quick_run_reports_both_frozen_detectors(tmp_path) -> None:
    run = run_experiment("mask-frozen-detr", quick=True, out=str(tmp_path / "run"))
    results = (run.path / "results.md").read_text()
    summary = json.loads((run.path / "summary.json").read_text())
    assert "| DETR (ours, frozen Lite0) |" in results and "| yolo_rep_n (from scratch) |" in results
    detr, yolo = summary["rows"]["DETR (ours, frozen Lite0)"], summary["rows"]["yolo_rep_n (from scratch)"]
    assert detr["steps"] == 3 and detr["finished"] and detr["pieces"] == 1
    assert detr["head_steps"] == yolo["head_steps"] == 3  # the same head recipe on both detectors
    for row in (detr, yolo):
        assert 0.0 <= row["box_map50"] <= 1.0 and 0.0 <= row["mask_map50"] <= 1.0
    pieces = json.loads((run.path / "detr_checkpoints" / "pieces.json").read_text())
    assert pieces["pieces"][0]["steps_after"] == 3

    # equal total CPU: budget = the DETR's training CPU + its head's, and both end-to-end arms stop there
    budget = summary["verdict"]["budget_cpu_s"]
    assert budget == pytest.approx(pieces["pieces"][0]["cpu_s"] + detr["head_cpu_s"])
    for name in ("DETR + head jointly (full fine-tuning, Lite0 frozen)", "Mask R-CNN (Lite0 + FPN 64, end to end)"):
        row = summary["rows"][name]
        assert f"| {name} |" in results
        assert budget <= row["cpu_s"] <= budget + row["max_step_cpu_s"] + 0.1 and row["steps"] < 100_000
        assert 0.0 <= row["box_map50"] <= 1.0 and 0.0 <= row["mask_map50"] <= 1.0

    # the same folder again: every arm is kept, nothing trains, the DETR gets no new piece
    again = json.loads((run_experiment("mask-frozen-detr", quick=True, out=str(run.path)).path / "summary.json")
                       .read_text())  # fmt: skip
    assert all(row["reused"] for row in again["rows"].values())
    assert again["rows"] == {k: {**v, "reused": True} for k, v in summary["rows"].items()}
    assert len(json.loads((run.path / "detr_checkpoints" / "pieces.json").read_text())["pieces"]) == 1


def test_a_checkpoint_folder_of_another_config_is_refused(tmp_path) -> None:
    folder = tmp_path / "detr"
    folder.mkdir()
    (folder / "last.json").write_text("{}")
    (folder / "pieces.json").write_text(json.dumps({"identity": {"detr": {}, "data": []}, "pieces": []}))
    cfg = MaskFrozenDetrConfig(image_size=64, per_kind=1, detr_steps=3, detr_checkpoints=str(folder),
                               pretrained_backbone=False, progress=False)  # fmt: skip
    with pytest.raises(PotpourriError, match="another config"):
        reproduce_mask_frozen_detr(cfg, out=str(tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.one_thread
def test_a_folder_of_the_earlier_version_gives_its_frozen_rows(tmp_path) -> None:
    import dataclasses

    import yaml

    cfg = MaskFrozenDetrConfig(image_size=64, per_kind=1, detr_steps=3, yolo_epochs=1, head_seconds=5.0, head_steps=3,
                               head_dim=16, pretrained_backbone=False, progress=False)  # fmt: skip
    folder = tmp_path / "run"
    folder.mkdir()
    older = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("maskrcnn_backbone", "arm_max_steps")}
    (folder / "config.yaml").write_text(yaml.safe_dump(older))
    head = {"head_steps": 7, "head_cpu_s": 0.25, "head_params": 11, "mask_map50": 0.5, "mask_map": 0.25}
    planted = {
        "DETR (ours, frozen Lite0)": {"steps": 3, **head},
        "yolo_rep_n (from scratch)": {"steps": 9, "finished": True, "pieces": 1, "cpu_s": 123.0, "wall_s": 130.0,
                                      "box_map50": 0.75, "box_map": 0.5, **head, "mask_map50": 0.625},
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps({"rows": planted}))
    summary = json.loads((reproduce_mask_frozen_detr(cfg, out=str(folder)).path / "summary.json").read_text())
    assert summary["adopted"] == ["detr_head", "yolo", "yolo_head"] and not (folder / "yolo").exists()  # no YOLO ran
    yolo = summary["rows"]["yolo_rep_n (from scratch)"]
    assert yolo["cpu_s"] == 123.0 and yolo["mask_map50"] == 0.625 and yolo["reused"]
    detr = summary["rows"]["DETR (ours, frozen Lite0)"]
    assert detr["head_steps"] == 7 and detr["mask_map50"] == 0.5  # the planted head; the DETR itself trained here
    assert summary["verdict"]["budget_cpu_s"] == pytest.approx(detr["cpu_s"] + 0.25)
    assert not summary["rows"]["Mask R-CNN (Lite0 + FPN 64, end to end)"]["reused"]  # the new arms ran
