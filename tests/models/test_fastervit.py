"""FasterViT: parity with the official ``fastervit`` package, its parameter counts, CT geometry, deploy mode."""

from __future__ import annotations

import fastervit  # noqa: F401  (registers faster_vit_*_224 into timm: the reference implementation)
import pytest
import timm
import torch
import torch.nn as nn
from fastervit.models import faster_vit as reference
from fastervit.models import faster_vit_any_res as reference_any_res

from potpourri.models.fastervit import (
    CONFIGS,
    FasterViT,
    FasterViTCfg,
    Grid,
    TokenInitializer,
    carrier_pool_geometry,
    faster_vit_0,
)

VARIANTS = ["0", "1", "2", pytest.param("3", marks=pytest.mark.slow)]  # FasterViT-3: 159.5 M params, ~10 s
# parameter counts of the package's faster_vit_{0..3}_224 (the README's 31.4 / 53.4 / 75.9 / 159.5 M)
PACKAGE_PARAMS_M = {"0": 31.4, "1": 53.4, "2": 75.9, "3": 159.5}


pytestmark = pytest.mark.one_thread  # tiny models: one torch thread (tests/conftest.py)


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    """Perturb every weight and the BN statistics, so zero biases or unit norms cannot hide a wiring error."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return model.eval()


def _reference(variant: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise(timm.create_model(f"faster_vit_{variant}_224"), seed)


def _ours_from(ref: nn.Module, cfg: FasterViTCfg, **kwargs) -> FasterViT:
    ours = FasterViT(cfg, **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same parameter and buffer names
    return ours


def _assert_parity(out: torch.Tensor, expected: torch.Tensor) -> None:
    """max |Δ| ≤ 1e-5, relative to the output's scale when that exceeds 1 (float32 sums of large activations)."""
    assert out.shape == expected.shape
    diff, scale = (out - expected).abs().max().item(), max(1.0, expected.abs().max().item())
    assert diff <= 1e-5 * scale, f"max |Δ| {diff:.2e} at scale {scale:.1f}"


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _record_carrier_tokens(block: nn.Module, seen: dict[str, torch.Tensor], key: str) -> None:
    """Remember the carrier tokens a HAT block returns (its output is ``(x, carrier_tokens)``)."""

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        seen[key] = output[1]

    block.register_forward_hook(hook)


def _record_input_shape(module: nn.Module, seen: dict[str, tuple[int, ...]], key: str) -> None:
    """Remember the shape of the first input ``module`` sees (the hook returns None: inputs stay unchanged)."""

    def hook(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.setdefault(key, tuple(args[0].shape))

    module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_equal_the_package_at_224(variant: str) -> None:
    ref = _reference(variant, seed=int(variant))
    ours = _ours_from(ref, CONFIGS[variant])
    assert _count(ours) == _count(ref)
    carrier_tokens: dict[str, torch.Tensor] = {}
    # the zero-padded bias (CT columns 0, window columns ≈ 16·sigmoid(·) ≈ 8) mutes CTs in the logits of a random
    # model, so the carrier tokens leaving stage 3 are compared directly
    for key, model in (("ref", ref), ("ours", ours)):
        _record_carrier_tokens(model.levels[2].blocks[-1], carrier_tokens, key)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected_features, features = ref.forward_features(x), ours.forward_features(x)
        expected, logits = ref.forward_head(expected_features), ours.forward_head(features)
    assert carrier_tokens["ours"].shape == (1, 16, 4 * CONFIGS[variant].dim)
    _assert_parity(carrier_tokens["ours"], carrier_tokens["ref"])
    assert expected.abs().max() > 0.1  # a non-degenerate output, so 1e-5 is a real bound
    _assert_parity(features, expected_features)
    _assert_parity(logits, expected)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts_round_to_the_published_ones(variant: str) -> None:
    with torch.device("meta"):  # no memory or init time: only shapes are counted (exact equality: parity test)
        ours = FasterViT(CONFIGS[variant])
    assert round(_count(ours) / 1e6, 1) == PACKAGE_PARAMS_M[variant]


def test_carrier_token_pool_geometry_matches_the_formula() -> None:
    # o = int(ct·H/window), s = int(H/o), k = H − (o−1)·s: H=14, window 7, ct 2 → o=4, s=3, k=5 (overlapping)
    assert carrier_pool_geometry(14, 7, 2) == (4, 3, 5)
    assert carrier_pool_geometry(21, 7, 2) == (6, 3, 6)
    ref_pool = reference.TokenInitializer(8, 14, 7, ct_size=2).to_global_feature.pool
    init = TokenInitializer(8, Grid(7, 2, 2, 2), (14, 14))
    assert (init.to_global_feature.pool.kernel_size, init.to_global_feature.pool.stride) == ((5, 5), (3, 3))
    assert (ref_pool.kernel_size, ref_pool.stride) == (5, 3)


def test_carrier_tokens_are_overlapping_means_regrouped_per_window() -> None:
    torch.manual_seed(0)
    init = TokenInitializer(8, Grid(7, 2, 2, 2), (14, 14))
    x = torch.randn(2, 8, 14, 14)
    conv = init.pos_embed(x)  # the depthwise 3×3 conv is torch's; the pooling and regrouping are checked
    expected = torch.empty(2, 16, 8)
    for wr in range(2):
        for wc in range(2):
            for a in range(2):
                for b in range(2):
                    i, j = 2 * wr + a, 2 * wc + b  # CT (a, b) of window (wr, wc) sits at (i, j) on the 4×4 grid
                    patch = conv[:, :, 3 * i : 3 * i + 5, 3 * j : 3 * j + 5]  # stride 3, kernel 5
                    expected[:, (2 * wr + wc) * 4 + 2 * a + b] = patch.mean((2, 3))
    torch.testing.assert_close(init(x, window=7), expected, rtol=1e-5, atol=1e-6)


def test_stage_three_attends_over_16_carrier_tokens_and_53_token_windows() -> None:
    torch.manual_seed(0)
    model = faster_vit_0().eval()
    seen: dict[str, tuple[int, ...]] = {}
    stage3, stage4 = model.levels[2].blocks[0], model.levels[3].blocks[0]
    _record_input_shape(stage3.hat_attn, seen, "ct")
    _record_input_shape(stage3.attn, seen, "local")
    _record_input_shape(stage4.attn, seen, "last")
    with torch.inference_mode():
        model(torch.randn(1, 3, 224, 224))
    assert seen == {"ct": (1, 16, 256), "local": (4, 4 + 49, 256), "last": (1, 49, 512)}
    assert not hasattr(stage4, "hat_attn") and stage3.attn.pos_emb_funct.relative_bias.shape == (1, 8, 53, 53)


def test_propagation_and_layer_scale_equal_the_package() -> None:
    """FasterViT-3..6 features (layer scale, CT propagation into the windows) on a small, fast width."""
    kwargs = {"dim": 32, "in_dim": 16, "depths": (1, 1, 3, 2), "num_heads": (2, 2, 4, 4), "layer_scale": 0.5}
    torch.manual_seed(0)
    ref = reference.FasterViT(
        window_size=[7] * 4, ct_size=2, mlp_ratio=4, layer_scale_conv=0.5, do_propagation=True, **kwargs
    )
    ref = _randomise(ref, seed=3)
    ours = _ours_from(ref, FasterViTCfg(layer_scale_conv=0.5, do_propagation=True, **kwargs))
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected, out = ref(x), ours(x)
        ours.levels[2].blocks[-1].propagate = False  # the check above must depend on propagation
        without = ours(x)
    _assert_parity(out, expected)
    assert (without - expected).abs().max() > 1e-3


def test_other_input_sizes_equal_the_packages_any_res_model() -> None:
    """Built for 224, run at 256: stage 3 is padded 16 → 21 (3×3 windows, 36 CTs), as faster_vit_0_any_res(256)."""
    torch.manual_seed(0)
    ref = _randomise(reference_any_res.faster_vit_0_any_res(resolution=[256, 256]), seed=4)
    ours = faster_vit_0().eval()
    geometry_buffers = ("relative_coords_table", "relative_position_index", "relative_bias")
    weights = {k: v for k, v in ref.state_dict().items() if not k.endswith(geometry_buffers)}
    result = ours.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and all(k.endswith(geometry_buffers) for k in result.missing_keys)
    x = torch.randn(1, 3, 256, 256)
    with torch.inference_mode():
        expected, out = ref(x), ours(x)
    _assert_parity(out, expected)


def test_deploy_caches_position_biases_with_identical_outputs() -> None:
    torch.manual_seed(0)
    model = _randomise(faster_vit_0(), seed=5)
    x, x_other = torch.randn(1, 3, 224, 224), torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        before, before_other = model(x), model(x_other)
        model.reparameterize().reparameterize()  # idempotent
        after, after_other = model(x), model(x_other)
        for name, p in model.named_parameters():
            if "cpb_mlp" in name:
                p.zero_()  # the cached biases must no longer need the MLPs
        cached = model(x)
    assert torch.equal(before, after) and torch.equal(after, cached)
    assert torch.equal(before_other, after_other)  # other sizes still evaluate the MLPs


def test_loading_weights_leaves_deploy_mode() -> None:
    torch.manual_seed(0)
    deployed, fresh = faster_vit_0().eval().reparameterize(), _randomise(faster_vit_0(), seed=6)
    deployed.load_state_dict(fresh.state_dict())  # its relative_bias buffers are zeros: never deployed
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(deployed(x), fresh(x))


def test_64px_forward_backward_uses_one_shrunken_window_with_carrier_tokens() -> None:
    torch.manual_seed(0)
    model = faster_vit_0(num_classes=5).train()
    seen: dict[str, tuple[int, ...]] = {}
    _record_input_shape(model.levels[2].blocks[0].attn, seen, "s3")
    _record_input_shape(model.levels[3].blocks[0].attn, seen, "s4")
    out = model(torch.randn(2, 3, 64, 64))
    out.square().mean().backward()
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert seen == {"s3": (2, 4 + 16, 256), "s4": (2, 4, 512)}  # 4×4 map: one 4×4 window + 2×2 CTs; then 2×2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_timm_contract_and_dense_features() -> None:
    model = timm.create_model("faster_vit_0", num_classes=3).eval()
    x = torch.randn(1, 3, 128, 160)
    with torch.inference_mode():
        features = model.forward_intermediates(x)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert [f.shape[1] for f in features] == [i["num_chs"] for i in model.feature_info] == [64, 128, 256, 512]
    assert [x.shape[-1] // f.shape[-1] for f in features] == [i["reduction"] for i in model.feature_info]
    assert pooled.shape == (1, model.num_features) and model.get_classifier().out_features == 3
    model.reset_classifier(7)
    assert model(x).shape == (1, 7)
