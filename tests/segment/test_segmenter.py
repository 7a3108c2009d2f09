"""The defect segmenter: learns a planted task, encoder policies, save/load, input checks, metrics, CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from potpourri.core.errors import PotpourriError
from potpourri.core.metrics import iou_per_class
from potpourri.segment.segmenter import (
    Segmenter,
    SegmenterConfig,
    check_images,
    check_masks,
    evaluate_segmentation,
    train_segmenter,
)
from tests.planted import texture_crops

SIZE = 48
CLASS_NAMES = ("background", "bright", "dark")


def planted_segmentation(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Brick crops with a bright square (class 1) and a dark square (class 2) at seeded spots, exact masks."""
    rng = np.random.default_rng(seed)
    images = np.stack(texture_crops("brick", (0, 320), n, seed=seed, size=SIZE))
    masks = np.zeros((n, SIZE, SIZE), np.int64)
    for i in range(n):
        for cls, colour in ((1, (250, 250, 40)), (2, (10, 10, 60))):
            while True:
                top, left = (int(v) for v in rng.integers(2, SIZE - 12, 2))
                if not masks[i, top : top + 10, left : left + 10].any():
                    break
            images[i, top : top + 10, left : left + 10] = colour
            masks[i, top : top + 10, left : left + 10] = cls
    return images, masks


@pytest.fixture(scope="module")
def planted() -> tuple[np.ndarray, np.ndarray]:
    return planted_segmentation(6, seed=0)


@pytest.fixture
def backbone(lite0) -> torch.nn.Module:
    """A private copy of the pretrained Lite0 (training the encoder must not leak into other tests)."""
    return copy.deepcopy(lite0)


def config(**overrides) -> SegmenterConfig:
    base = {"class_names": CLASS_NAMES, "image_size": SIZE, "steps": 4, "batch_size": 4, "seed": 0}
    return SegmenterConfig(**{**base, **overrides})


def encoder_state(seg: Segmenter) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in seg.net.encoder.state_dict().items()}


def test_learns_planted_squares_to_high_iou(planted, backbone) -> None:
    images, masks = planted
    seg = train_segmenter(images, masks, config(steps=80, lr=5e-3), backbone=backbone, progress=False)
    ious = iou_per_class(seg.predict(images), masks, 3)
    assert ious[1] > 0.8 and ious[2] > 0.8, ious  # an untrained head scores ~0 on both square classes


def test_frozen_encoder_stays_bit_identical_while_decoder_trains(planted, backbone) -> None:
    images, masks = planted
    seg = Segmenter(config(encoder="frozen"), backbone=backbone)
    before_encoder = encoder_state(seg)
    before_head = seg.net.classifier.weight.detach().clone()
    seg.fit(images, masks, progress=False)
    after = seg.net.encoder.state_dict()
    assert all(torch.equal(before_encoder[k], after[k]) for k in before_encoder)  # weights and BN buffers
    assert not torch.equal(before_head, seg.net.classifier.weight)
    assert seg.trainable_parameters()["encoder"] == 0


def test_full_encoder_trains_weights_but_keeps_bn_statistics(planted, backbone) -> None:
    images, masks = planted
    seg = Segmenter(config(encoder="full"), backbone=backbone)
    before = encoder_state(seg)
    seg.fit(images, masks, progress=False)
    after = seg.net.encoder.state_dict()
    assert not torch.equal(before["conv_stem.weight"], after["conv_stem.weight"])
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)


def test_partial_encoder_trains_only_the_chosen_block(planted, backbone) -> None:
    images, masks = planted
    seg = Segmenter(config(encoder="partial", tune_blocks=("blocks.2.1",)), backbone=backbone)
    before = encoder_state(seg)
    seg.fit(images, masks, progress=False)
    after = seg.net.encoder.state_dict()
    changed = {".".join(k.split(".")[:3]) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"blocks.2.1"}
    with pytest.raises(PotpourriError, match=r"unknown block 'blocks\.9\.0'"):
        Segmenter(config(encoder="partial", tune_blocks=("blocks.9.0",)), backbone=backbone).net  # noqa: B018


def test_default_partial_tunes_the_deepest_tapped_stage(backbone) -> None:
    seg = Segmenter(config(encoder="partial"), backbone=backbone)
    trained = {n.split(".")[1] for n, p in seg.net.encoder.named_parameters() if p.requires_grad}
    assert trained == {str(seg.config.taps[-1])}


def test_encoder_block_map_is_the_tuning_engines_restricted_to_the_run_stages(backbone) -> None:
    from potpourri.models.blocks import block_map

    full = block_map(backbone)
    seg = Segmenter(config(), backbone=backbone)
    ours = seg.encoder_block_map()
    last = seg.config.taps[-1]
    expected = [k for k in full if k == "stem" or (k.startswith("blocks.") and int(k.split(".")[1]) <= last)]
    assert list(ours) == expected and all(ours[k] == full[k] for k in ours)


def test_same_seed_same_weights(planted, lite0) -> None:
    images, masks = planted
    a = train_segmenter(images, masks, config(steps=3), backbone=copy.deepcopy(lite0), progress=False)
    b = train_segmenter(images, masks, config(steps=3), backbone=copy.deepcopy(lite0), progress=False)
    sa, sb = a.net.state_dict(), b.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_round_trip_gives_identical_predictions(planted, backbone, tmp_path: Path) -> None:
    images, masks = planted
    seg = train_segmenter(images, masks, config(steps=3), backbone=backbone, progress=False)
    seg.save(tmp_path / "run")
    loaded = Segmenter.load(tmp_path / "run")
    assert loaded.config.class_names == CLASS_NAMES
    np.testing.assert_array_equal(loaded.predict_proba(images), seg.predict_proba(images))
    meta = json.loads((tmp_path / "run" / "segmenter.json").read_text())
    assert meta["format"] == "potpourri.segmenter" and meta["config"]["steps"] == 3


def test_load_rejects_missing_and_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(PotpourriError, match="not a segmenter run"):
        Segmenter.load(tmp_path)
    (tmp_path / "segmenter.json").write_text(json.dumps({"format": "potpourri.segmenter", "format_version": 99}))
    with pytest.raises(PotpourriError, match="format 99"):
        Segmenter.load(tmp_path)


def test_predict_returns_masks_at_each_input_size(planted, backbone) -> None:
    images, masks = planted
    seg = train_segmenter(images, masks, config(steps=2), backbone=backbone, progress=False)
    big = np.asarray(Image.fromarray(images[0]).resize((80, 64)))[None]
    pred = seg.predict(big)
    assert pred.shape == (1, 64, 80) and pred.dtype == np.int64 and pred.max() < 3
    result = seg.inspection_results(images[:1])[0]
    assert result.anomaly_map.shape == (SIZE, SIZE) and result.mask.dtype == bool
    assert seg.latency_ms(rounds=2)["ms_per_image"] > 0


def test_bad_inputs_raise_one_line_errors(planted) -> None:
    images, masks = planted
    with pytest.raises(PotpourriError, match="4 channels"):
        check_images(np.zeros((2, SIZE, SIZE, 4), np.uint8))
    with pytest.raises(PotpourriError, match="uint8"):
        check_images(images.astype(np.float32))
    with pytest.raises(PotpourriError, match="unknown class ids \\[3, 7\\]"):
        bad = masks.copy()
        bad[0, 0, 0], bad[1, 0, 0] = 3, 7
        check_masks(bad, images, 3, CLASS_NAMES)
    with pytest.raises(PotpourriError, match="masks have shape"):
        check_masks(masks[:, :-1], images, 3)
    with pytest.raises(PotpourriError, match="integer class ids"):
        check_masks(masks.astype(np.float32), images, 3)
    with pytest.raises(PotpourriError, match="unknown encoder policy 'half'"):
        Segmenter(config(encoder="half"))
    with pytest.raises(PotpourriError, match="not trained"):
        Segmenter(config()).save("/nonexistent")


def test_evaluate_segmentation_matches_a_hand_computed_case() -> None:
    target = np.array([[0, 0, 1, 1], [0, 2, 2, 0]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 0]])
    result = evaluate_segmentation(pred, target, ("bg", "a", "b"))
    # bg: 3 shared of 5 in the union; a: 2 of 3; b: 1 of 2
    assert result["per_class_iou"] == pytest.approx({"bg": 3 / 5, "a": 2 / 3, "b": 1 / 2})
    assert result["miou"] == pytest.approx((3 / 5 + 2 / 3 + 1 / 2) / 3)
    assert result["miou_defects"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert result["pixel_accuracy"] == pytest.approx(6 / 8)


def write_images_masks(root: Path, images: np.ndarray, masks: np.ndarray) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        Image.fromarray(image).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{i:03d}_mask.png")
    return root


@pytest.mark.slow
def test_cli_train_then_predict_on_an_images_masks_folder(planted, tmp_path: Path, capsys) -> None:
    from potpourri.cli import main

    images, masks = planted
    data = write_images_masks(tmp_path / "data", images, masks)
    run = tmp_path / "run"
    argv = ["inspect", "segment-train", "--data", str(data), "--out", str(run), "--steps", "3", "--image-size", "48",
            "--batch-size", "4", "--threads", "1"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_images"] + summary["test_images"] == len(images)
    assert set(summary["test"]["per_class_iou"]) == {"background", "class_1", "class_2"}
    assert (run / "report.html").is_file() and (run / "images" / "test_panels.png").is_file()
    assert (
        main(["inspect", "segment-predict", str(run), str(data / "images" / "000.png"), "--out", str(tmp_path / "p")])
        == 0
    )
    mask = np.asarray(Image.open(tmp_path / "p" / "masks" / "000_000_mask.png"))
    assert mask.shape == (SIZE, SIZE) and mask.max() <= 2
    assert "defect fraction" in capsys.readouterr().out
    from potpourri import load_run

    predictor = load_run(run)  # the run reloads by its metadata.json kind, with the same masks as segment-predict
    assert json.loads((run / "metadata.json").read_text())["kind"] == predictor.kind == "segmenter"
    assert np.array_equal(predictor.predict([str(data / "images" / "000.png")])[0], mask)


def test_cli_names_the_expected_layouts_for_a_bad_folder(tmp_path: Path, capsys) -> None:
    from potpourri.cli import main

    (tmp_path / "stuff").mkdir()
    assert main(["inspect", "segment-train", "--data", str(tmp_path / "stuff"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "images/ and masks/" in err[0] and "Defect Spectrum" in err[0]


def test_cli_rejects_masks_with_unknown_class_ids(planted, tmp_path: Path, capsys) -> None:
    from potpourri.cli import main

    images, masks = planted
    root = tmp_path / "ds" / "brick"
    for sub in ("image/scratch", "mask/scratch"):
        (root / sub).mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps({"classes": [{"id": 0, "name": "good"}, {"id": 1, "name": "x"}]}))
    for i in range(2):
        Image.fromarray(images[i]).save(root / "image/scratch" / f"{i:03d}.png")
        Image.fromarray(masks[i].astype(np.uint8)).save(root / "mask/scratch" / f"{i:03d}_mask.png")  # ids 0..2
    argv = ["inspect", "segment-train", "--data", str(root), "--out", str(tmp_path / "r"), "--steps", "1",
            "--image-size", "48"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown class ids [2]" in err and "0=good" in err
