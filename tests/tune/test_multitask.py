"""Multi-task inference: one shared backbone gives every task exactly its own fine-tuned model's outputs, and the
frozen prefix before the first tuned block runs once for all tasks."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from potpourri.core.errors import PotpourriError
from potpourri.models.blocks import block_map, entry_of
from potpourri.tune.multitask import BlockProgram, MultiTaskModel
from potpourri.tune.trainer import fit
from tests.tune.tune_testkit import colour_data, tiny_model

TASKS = {"early": ["blocks.0.1"], "late": ["blocks.1.0", "neck"], "probe": []}


def _tuned_tasks(out_dir=None) -> dict:
    """Three SubTuning runs of the same TinyNet (the probe task has 5 classes, the others 3)."""
    results = {}
    for i, (name, blocks) in enumerate(TASKS.items()):
        classes = 5 if name == "probe" else 3
        model = tiny_model()
        if classes != 3:
            torch.manual_seed(i)
            model.classifier = nn.Linear(16, classes)  # a head of its own size on the same frozen backbone
        images = colour_data(24, seed=i).tensors[0]
        data = TensorDataset(images, torch.arange(24) % classes)
        out = None if out_dir is None else out_dir / name
        results[name] = fit(
            model, data, None, "subtuning", blocks=blocks, epochs=2, lr=5e-2, batch_size=8, progress=False, out=out
        )
    return results


def test_outputs_equal_each_separately_tuned_model_exactly():
    results = _tuned_tasks()
    shared = MultiTaskModel.from_results(tiny_model(), results)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = shared(x)
        for name, result in results.items():
            expected = result.model.eval()(x)
            assert torch.equal(outputs[name], expected), name
    assert outputs["probe"].shape == (6, 5) and outputs["early"].shape == (6, 3)
    assert shared.describe()["tasks"]["late"]["branches_at"] == "blocks.1.0"


def test_the_shared_prefix_runs_once_and_each_task_runs_only_its_own_path():
    shared = MultiTaskModel.from_results(tiny_model(), _tuned_tasks())
    calls: Counter[str] = Counter()
    for owner, root in [("backbone", shared.backbone), *((t, m) for t, m in shared.tuned.items())]:
        for name, module in root.named_modules():
            if name.count(".") <= 2 and name:
                module.register_forward_hook(lambda *_args, key=f"{owner}/{name}": calls.update([key]))
    with torch.no_grad():
        shared(torch.randn(2, 3, 8, 8))
    # stem and blocks.0.0 come before every task's first tuned block: once, not three times
    assert calls["backbone/conv_stem"] == calls["backbone/bn1"] == calls["backbone/blocks.0.0"] == 1
    # the trunk continues to the latest branch point (the probe's head) once; each task's copies run once
    assert calls["backbone/blocks.0.1"] == 1 and calls["early/blocks:0:1"] == 1
    # blocks.1.0 sees the trunk's input (for the probe) and the early task's own activations
    assert calls["backbone/blocks.1.0"] == 2 and calls["late/blocks:1:0"] == 1
    # the neck: trunk + early; late has its own neck copy
    assert calls["backbone/conv_head"] == 2 and calls["late/conv_head"] == 1
    assert "backbone/classifier" not in calls  # every task brings a head: the backbone's is dropped
    assert isinstance(shared.backbone.classifier, nn.Identity)


def test_parameter_memory_is_the_backbone_once_plus_each_tasks_tuned_entries():
    results = _tuned_tasks()
    backbone = tiny_model()
    shared = MultiTaskModel.from_results(backbone, results)
    size = {n: sum(p.numel() for p in m.parameters()) for n, m in backbone.named_modules() if n}
    head = {name: sum(p.numel() for p in r.model.classifier.parameters()) for name, r in results.items()}
    backbone_without_head = sum(p.numel() for p in backbone.parameters()) - size["classifier"]
    expected = {
        "shared": backbone_without_head,
        "early": size["blocks.0.1"] + head["early"],
        "late": size["blocks.1.0"] + size["conv_head"] + size["bn2"] + head["late"],
        "probe": head["probe"],
    }
    counts = shared.parameter_counts()
    assert {k: counts[k] for k in expected} == expected
    assert counts["total"] == sum(expected.values())
    separate = sum(sum(p.numel() for p in r.model.parameters()) for r in results.values())
    assert counts["total"] < separate


def test_from_runs_matches_the_in_memory_results(tmp_path):
    results = _tuned_tasks(tmp_path)
    from_disk = MultiTaskModel.from_runs(tiny_model(), {name: tmp_path / name for name in TASKS})
    from_memory = MultiTaskModel.from_results(tiny_model(), results)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        a, b = from_disk(x), from_memory(x)
    assert all(torch.equal(a[name], b[name]) for name in TASKS)
    with pytest.raises(PotpourriError, match="is not a finished tune run"):
        MultiTaskModel.from_runs(tiny_model(), {"x": tmp_path / "missing"})


def test_a_task_that_changed_a_frozen_block_is_rejected():
    results = _tuned_tasks()
    bad = copy.deepcopy(results["early"].model)
    with torch.no_grad():
        bad.blocks[1][0].conv_pw.weight.add_(1e-3)  # not among its tuned entries
    with pytest.raises(
        PotpourriError, match=r"task 'early' differs from the shared backbone in 'blocks\.1\.0\.conv_pw"
    ):
        MultiTaskModel(tiny_model(), {"early": (bad, ["blocks.0.1", "head"])})
    with pytest.raises(PotpourriError, match=r"unknown block 'blocks\.9'; valid blocks: stem"):
        MultiTaskModel(tiny_model(), {"x": (tiny_model(), ["blocks.9"])})


def test_efficientnet_lite0_splits_exactly_with_perturbed_blocks():
    import potpourri

    torch.manual_seed(0)
    backbone = potpourri.create_model("efficientnet_lite0", pretrained=False, num_classes=4).eval()
    bmap = block_map(backbone)
    tasks = {}
    for name, entries in {"mid": ["blocks.3.1", "head"], "late": ["blocks.6.0", "neck", "head"]}.items():
        model = copy.deepcopy(backbone)
        with torch.no_grad():  # stand-in for fine-tuning: new weights in the tuned entries only
            for param_name, param in model.named_parameters():
                if entry_of(param_name, bmap) in entries:
                    param.add_(0.01 * torch.randn_like(param))
        tasks[name] = (model, entries)
    shared = MultiTaskModel(backbone, tasks)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outputs = shared(x)
        for name, (model, _) in tasks.items():
            assert torch.equal(outputs[name], model(x)), name
    program = BlockProgram(backbone)
    assert program.entries[program.branch_point(["blocks.3.1"])] == "blocks.3.1"


@pytest.mark.slow
def test_merge_tasks_cli_reproduces_each_run_and_reports_the_savings(tmp_path, capsys):
    from potpourri.cli import main

    common = ["--data", "ds-synth:classification:brick", "--img-size", "32", "--epochs", "1", "--no-progress"]
    for block in ("blocks.6.0", "blocks.4.2"):
        assert (
            main(["tune", *common, "--strategy", "subtuning", "--blocks", block, "--out", str(tmp_path / block)]) == 0
        )
    runs = [f"late={tmp_path / 'blocks.6.0'}", f"mid={tmp_path / 'blocks.4.2'}"]
    assert main(["merge-tasks", *runs, "--img-size", "64", "--out", str(tmp_path / "merged")]) == 0
    summary = json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert summary["max_abs_output_diff"] == 0.0
    assert summary["tasks"]["mid"]["branches_at"] == "blocks.4.2"
    assert summary["macs"]["shared"] < summary["macs"]["separate"]
    assert summary["params_total"]["shared"] < summary["params_total"]["separate"]
    assert "leaves the shared trunk at blocks.6.0" in capsys.readouterr().out
