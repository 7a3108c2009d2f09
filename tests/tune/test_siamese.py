"""Siamese SubTuning: the head reads the tuned copy's and a frozen copy's pooled features; only the chosen blocks of
the tuned copy and the head train; a ``tune`` run with it reloads."""

from __future__ import annotations

import csv

import pytest
import timm
import torch

from potpourri import PotpourriError, create_model, load_run
from potpourri.cli import main
from potpourri.models.siamese import SiameseSubTuned
from potpourri.tune import fit
from potpourri.tune.strategies import get_strategy

from .test_runs import colour_folder
from .tune_testkit import colour_data

pytestmark = pytest.mark.one_thread


def tiny_siamese(num_classes: int = 3) -> SiameseSubTuned:
    torch.manual_seed(0)
    return SiameseSubTuned(timm.create_model("test_efficientnet", num_classes=num_classes), num_classes)


def pooled(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


def test_the_head_reads_both_copies_and_they_start_equal() -> None:
    model = tiny_siamese().eval()
    x = torch.randn(2, 3, 32, 32)
    tuned, frozen = pooled(model.tuned, x), pooled(model.frozen, x)
    torch.testing.assert_close(tuned, frozen)  # a copy: identical before tuning
    expected = torch.cat([tuned, frozen], 1) @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(model(x), expected)
    assert model.head.in_features == 2 * model.tuned.num_features


def test_only_the_chosen_blocks_and_the_head_train_and_the_frozen_copy_stays_bitwise() -> None:
    model = tiny_siamese()
    frozen_before = {k: v.clone() for k, v in model.frozen.state_dict().items()}
    other_before = {k: v.clone() for k, v in model.tuned.state_dict().items() if not k.startswith("blocks.4.")}
    data = colour_data(24, size=32)
    result = fit(model, data, data, "siamese-subtuning", blocks=["blocks.4.0"], epochs=2, lr=1e-2, batch_size=8,
                 progress=False)  # fmt: skip
    assert result.plan["trainable_entries"] == ["blocks.4.0", "head"]
    for key, value in model.frozen.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    for key, value in other_before.items():  # blocks outside the choice, BN statistics included, do not move
        assert torch.equal(model.tuned.state_dict()[key], value), key
    assert any(not torch.equal(p, model.frozen.get_parameter(n)) for n, p in model.tuned.named_parameters())


def test_the_strategy_refuses_a_plain_model_with_one_line() -> None:
    with pytest.raises(PotpourriError, match="needs a SiameseSubTuned model"):
        get_strategy("siamese-subtuning", blocks=["blocks.4.0"]).prepare(
            timm.create_model("test_efficientnet"), lr=1e-3
        )


@pytest.mark.slow
def test_a_siamese_tune_run_reloads_and_predicts_like_the_model_it_saved(tmp_path) -> None:
    data = colour_folder(tmp_path / "data", 6, seed=0)
    run = tmp_path / "run"
    argv = ["tune", "--data", str(data), "--strategy", "siamese-subtuning", "--blocks", "blocks.6.0", "--epochs", "2",
            "--lr", "0.01", "--image-size", "64", "--out", str(run), "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    classifier = load_run(run)
    assert isinstance(classifier.model, SiameseSubTuned) and classifier.classes == ["blue", "red"]
    held_out = colour_folder(tmp_path / "held_out", 2, seed=1)
    assert main(["predict", "--run", str(run), str(held_out), "--out", str(tmp_path / "pred")]) == 0
    rows = list(csv.DictReader((tmp_path / "pred" / "predictions.csv").open()))
    direct = classifier.predict([r["image"] for r in rows])
    assert [r["label1"] for r in rows] == [d["label"] for d in direct]
    assert [float(r["prob1"]) for r in rows] == pytest.approx([d["prob"] for d in direct], abs=1e-6)
    pretrained = create_model("efficientnet_lite0", pretrained=True).state_dict()
    for key, value in classifier.model.frozen.state_dict().items():  # the frozen copy is the pretrained network
        torch.testing.assert_close(value, pretrained[key], rtol=0, atol=0)
