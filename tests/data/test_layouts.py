"""Dataset layouts read DS-Synth back exactly, accept both colour-mask spellings, and reject bad input loudly."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from potpourri.core.errors import PotpourriError
from potpourri.data.layouts import DefectSpectrum, DSSynth, Folder, ImageFolder, MVTecAD, read_image
from potpourri.data.synth import CLASSES, make_sample


def test_defect_spectrum_reads_back_class_index_masks(tiny_synth) -> None:
    root, _ = tiny_synth
    ds = DefectSpectrum(root / "DS-Synth", "brick")
    assert len(ds) == 7 * 2  # six classes and multi, two each; DS folders hold defects only
    for i in range(len(ds)):
        sample = ds[i]
        kind, index = sample.path.parent.name, int(sample.path.stem)
        expected = make_sample("brick", "test", kind, index, size=48)
        np.testing.assert_array_equal(sample.image, expected.image)
        np.testing.assert_array_equal(sample.mask, expected.mask)
        assert sample.label == 1 and sample.defect_classes == expected.defect_classes
        np.testing.assert_array_equal(ds.color_mask(i), expected.mask)  # the palette mask decodes to the same


def test_mvtec_reads_back_binary_masks_and_good_train(tiny_synth) -> None:
    root, _ = tiny_synth
    train = MVTecAD(root / "MVTec-Synth", "gravel", "train")
    assert len(train) == 4 and all(train[i].label == 0 and train[i].mask.max() == 0 for i in range(4))
    test = MVTecAD(root / "MVTec-Synth", "gravel", "test")
    assert sorted({test[i].path.parent.name for i in range(len(test))}) == sorted([*CLASSES, "multi"])
    for i in range(len(test)):
        sample = test[i]
        kind, index = sample.path.parent.name, int(sample.path.stem)
        expected = make_sample("gravel", "test", kind, index, size=48)
        np.testing.assert_array_equal(sample.mask, (expected.mask > 0).astype(np.uint8))
        assert sample.label == int(kind != "good")


def _rgb_mask_copy(root: Path, tmp_path: Path, *, keep_index_masks: bool) -> Path:
    """Copy one category, respelled the way Defect Spectrum's pill category is: rgb_mask/NNN_rgb_mask.png."""
    target = tmp_path / "DS" / "brick"
    shutil.copytree(root / "DS-Synth" / "brick", target)
    (target / "rbg_mask").rename(target / "rgb_mask")
    for path in (target / "rgb_mask").rglob("*_rbg_mask.png"):
        path.rename(path.with_name(path.name.replace("_rbg_mask", "_rgb_mask")))
    if not keep_index_masks:
        shutil.rmtree(target / "mask")
    return target.parent


@pytest.mark.parametrize("keep_index_masks", [True, False])
def test_both_colour_mask_spellings_give_the_same_masks(tiny_synth, tmp_path, keep_index_masks: bool) -> None:
    root, _ = tiny_synth
    reference = DefectSpectrum(root / "DS-Synth", "brick")
    respelled = DefectSpectrum(_rgb_mask_copy(root, tmp_path, keep_index_masks=keep_index_masks), "brick")
    assert respelled.color_mask_dir.name == "rgb_mask"
    assert len(respelled) == len(reference)
    for i in range(len(reference)):
        np.testing.assert_array_equal(respelled[i].mask, reference[i].mask)
        np.testing.assert_array_equal(respelled.color_mask(i), reference[i].mask)


def test_unknown_category_lists_the_ones_found(tiny_synth) -> None:
    root, _ = tiny_synth
    with pytest.raises(PotpourriError, match=r"unknown category 'bottle' .*found: brick, gravel$"):
        MVTecAD(root / "MVTec-Synth", "bottle", "test")
    with pytest.raises(PotpourriError, match=r"unknown category 'pill' .*found: brick, gravel"):
        DefectSpectrum(root / "DS-Synth", "pill")


def _mvtec_tree(tmp_path: Path, rng: np.random.Generator, write_png) -> Path:
    base = tmp_path / "mv" / "widget"
    write_png(base / "train/good/000.png", rng.integers(0, 255, (16, 20, 3), dtype=np.uint8))
    write_png(base / "test/good/000.png", rng.integers(0, 255, (16, 20, 3), dtype=np.uint8))
    write_png(base / "test/dent/000.png", rng.integers(0, 255, (16, 20, 3), dtype=np.uint8))
    write_png(base / "ground_truth/dent/000_mask.png", np.zeros((16, 20), np.uint8))
    return tmp_path / "mv"


def test_defect_image_without_mask_is_named(write_png, tmp_path, rng) -> None:
    root = _mvtec_tree(tmp_path, rng, write_png)
    (root / "widget/ground_truth/dent/000_mask.png").unlink()
    with pytest.raises(PotpourriError, match=r"test/dent/000\.png: defect image has no mask \(expected .*000_mask"):
        MVTecAD(root, "widget", "test")


def test_mask_of_other_size_is_named(write_png, tmp_path, rng) -> None:
    root = _mvtec_tree(tmp_path, rng, write_png)
    write_png(root / "widget/ground_truth/dent/000_mask.png", np.zeros((16, 21), np.uint8))
    ds = MVTecAD(root, "widget", "test")
    index = next(i for i, item in enumerate(ds.items) if item[0].parent.name == "dent")
    with pytest.raises(PotpourriError, match=r"000_mask\.png: mask is 21x16 but its image .*000\.png is 20x16"):
        ds[index]


def test_truncated_image_is_named(write_png, tmp_path, rng) -> None:
    root = _mvtec_tree(tmp_path, rng, write_png)
    path = root / "widget/train/good/000.png"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(PotpourriError, match=r"train/good/000\.png: cannot read image \(corrupt or truncated"):
        MVTecAD(root, "widget", "train")[0]


def test_empty_folder_is_named(write_png, tmp_path, rng) -> None:
    root = _mvtec_tree(tmp_path, rng, write_png)
    (root / "widget/train/good/000.png").unlink()
    with pytest.raises(PotpourriError, match=r"train/good: no images found"):
        MVTecAD(root, "widget", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PotpourriError, match=r"empty: no class folders found"):
        ImageFolder(tmp_path / "empty")


def test_rgba_and_16_bit_images(write_png, tmp_path, rng) -> None:
    rgb = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    opaque = np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(read_image(write_png(tmp_path / "opaque.png", opaque)), rgb)
    see_through = opaque.copy()
    see_through[0, 0, 3] = 10
    with pytest.raises(PotpourriError, match=r"see_through\.png: image has transparent pixels"):
        read_image(write_png(tmp_path / "see_through.png", see_through))
    deep = rng.integers(0, 65535, (8, 8), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    converted = read_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(converted, np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=2))


def test_image_folder_labels_follow_sorted_class_names(write_png, tmp_path, rng) -> None:
    for name, count in (("ok", 2), ("bad", 3)):
        for i in range(count):
            write_png(tmp_path / "cls" / name / f"{i}.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    ds = ImageFolder(tmp_path / "cls")
    assert ds.classes == ["bad", "ok"]
    assert sorted(ds[i].label for i in range(len(ds))) == [0, 0, 0, 1, 1]
    assert all(ds[i].defect_classes == (ds.classes[ds[i].label],) for i in range(len(ds)))


def test_folder_pairs_masks_by_stem_and_requires_them(write_png, tmp_path, rng) -> None:
    write_png(tmp_path / "good/a.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    write_png(tmp_path / "scratch/b.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    mask = (rng.random((8, 8)) > 0.5).astype(np.uint8)
    write_png(tmp_path / "masks/scratch/b_mask.png", mask)
    ds = Folder(tmp_path / "good", [tmp_path / "scratch"], tmp_path / "masks")
    assert [ds[i].label for i in range(2)] == [0, 1]
    np.testing.assert_array_equal(ds[1].mask, mask)
    assert ds[0].mask.max() == 0 and ds[1].defect_classes == ("scratch",)
    write_png(tmp_path / "scratch/c.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    with pytest.raises(PotpourriError, match=r"scratch/c\.png: defect image has no mask"):
        Folder(tmp_path / "good", tmp_path / "scratch", tmp_path / "masks")


def test_ds_synth_dataset_transform_and_labels() -> None:
    ds = DSSynth("tissue", "test", 7, size=32, transform=lambda im: im.astype(np.float32).mean())
    assert [ds[i].label for i in range(7)] == [0, 1, 1, 1, 1, 1, 1]
    assert isinstance(ds[0].image, np.float32)


def test_model_transform_uses_the_pretrained_config(tiny_synth) -> None:
    from potpourri.core.weights import PretrainedCfg
    from potpourri.data.transforms import model_transform

    cfg = PretrainedCfg(name="toy", input_size=(3, 48, 48), mean=(0.2, 0.4, 0.6), std=(0.5, 0.25, 0.125))
    root, _ = tiny_synth
    ds = DefectSpectrum(root / "DS-Synth", "brick", transform=model_transform(cfg))
    raw = DefectSpectrum(root / "DS-Synth", "brick")[0].image.astype(np.float64) / 255.0  # already 48 px: no resize
    expected = (raw - np.array(cfg.mean)) / np.array(cfg.std)
    np.testing.assert_allclose(ds[0].image.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert model_transform(cfg, size=32)(np.zeros((48, 48, 3), np.uint8)).shape == (3, 32, 32)
