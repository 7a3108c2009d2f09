"""PatchCore taps any timm backbone: EfficientNet blocks, ResNet / ConvNeXt stages and ViT blocks through
``forward_intermediates`` (tiny random models), with sensible default taps and one-line errors for bad ones."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from potpourri.cli import main
from potpourri.core.errors import PotpourriError
from potpourri.core.metrics import image_auroc
from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig, PatchFeatures, default_layers

pytestmark = pytest.mark.one_thread


@pytest.mark.parametrize(
    ("name", "size", "layers", "stride"),
    [("resnet10t", 64, (2, 3), 8), ("convnext_atto", 64, (1, 2), 8), ("vit_tiny_patch16_224", 224, (4, 8), 16)],
)
def test_default_taps_and_the_patch_grid_follow_the_family(name, size, layers, stride):
    torch.manual_seed(0)
    backbone = timm.create_model(name, pretrained=False).eval()
    assert default_layers(backbone) == layers
    features = PatchFeatures(backbone, layers=layers, embed_dim=96)
    with torch.no_grad():
        out = features(torch.randn(2, 3, size, size))
        raw = backbone.forward_intermediates(
            torch.randn(1, 3, size, size), indices=list(layers), intermediates_only=True
        )
    assert out.shape == (2, 96, size // stride, size // stride)
    assert [r.shape[1] for r in raw] == [t.shape[1] for t in features.taps(torch.randn(1, 3, size, size))]


def test_taps_equal_the_backbones_own_intermediate_features():
    backbone = timm.create_model("resnet10t", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        taps = PatchFeatures(backbone, layers=(2, 3)).taps(x)
        manual = backbone.layer2(backbone.layer1(backbone.maxpool(backbone.act1(backbone.bn1(backbone.conv1(x))))))
    assert torch.allclose(taps[0], manual, atol=1e-6)


def test_bad_taps_are_one_line_errors():
    with pytest.raises(PotpourriError, match=r"feature indices 0\.\.4"):
        PatchFeatures(timm.create_model("resnet10t", pretrained=False), layers=(2, 7))
    with pytest.raises(PotpourriError, match="cannot tap Linear"):
        PatchFeatures(torch.nn.Linear(2, 2), layers=(0,))


def test_patchcore_on_a_random_resnet_still_finds_the_planted_squares(planted):
    config = PatchCoreConfig(backbone="timm/resnet10t", pretrained=False, layers=(), image_size=64, coreset_ratio=0.5)
    torch.manual_seed(0)
    model = PatchCore(config).fit(planted.train)
    assert model.config.layers == (2, 3)  # resolved and saved with the run
    scores, maps = model.score(planted.test)
    assert maps.shape == (len(planted.test), 64, 64)
    assert image_auroc(planted.labels, scores) >= 0.8  # bright/dark squares stand out even in random features


def test_inspect_fit_cli_takes_backbone_and_layers(mvtec_folder, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["inspect", "fit", "--data", str(mvtec_folder), "--image-size", "64", "--out", str(out)]
    assert main([*argv, "--backbone", "timm/convnext_atto", "--no-pretrained", "--layers", "1,2"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["config"]["backbone"] == "timm/convnext_atto" and meta["config"]["layers"] == [1, 2]
    bad = tmp_path / "bad"
    assert main([*argv[:-1], str(bad), "--backbone", "timm/resnet10t", "--no-pretrained", "--layers", "9"]) == 2
    assert "feature indices" in capsys.readouterr().err and not bad.exists()
