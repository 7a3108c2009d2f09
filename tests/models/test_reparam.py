"""Re-parameterisation: fused eval outputs equal the multi-branch ones; fusion is idempotent; timm models too."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from potpourri import create_model, reparameterize
from potpourri.models.rep import RepConv
from potpourri.models.reparam import is_reparameterized


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize(
    ("in_chs", "out_chs", "stride", "groups"),
    [(8, 8, 1, 1), (8, 8, 2, 1), (8, 16, 1, 1), (8, 8, 1, 4), (12, 12, 1, 3), (8, 16, 2, 2)],
)
def test_repconv_fusion_is_exact_in_eval(in_chs: int, out_chs: int, stride: int, groups: int) -> None:
    torch.manual_seed(0)
    block = RepConv(in_chs, out_chs, stride=stride, groups=groups)
    _randomise_bn(block)
    block.eval()
    x = torch.randn(2, in_chs, 11, 9)
    expected = block(x)
    # an independent reference: the three branches' sum before the activation, computed branch by branch
    branches = block.conv3x3(x) + block.conv1x1(x) + (block.identity(x) if block.identity is not None else 0)
    torch.testing.assert_close(expected, torch.relu(branches))
    block.reparameterize()
    assert block.reparam_conv is not None and not hasattr(block, "conv3x3")
    assert (block(x) - expected).abs().max() <= 1e-5
    state = {k: v.clone() for k, v in block.state_dict().items()}
    block.reparameterize()  # idempotent
    assert all(torch.equal(state[k], v) for k, v in block.state_dict().items())


def test_identity_branch_only_when_shapes_allow() -> None:
    assert RepConv(8, 8).identity is not None
    assert RepConv(8, 16).identity is None and RepConv(8, 8, stride=2).identity is None


def test_training_works_before_fusion() -> None:
    torch.manual_seed(0)
    model = create_model("repconvnet_s", num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.parameters())


def test_model_level_fusion_matches_and_leaves_the_original() -> None:
    torch.manual_seed(0)
    model = create_model("repconvnet_s", num_classes=5)
    _randomise_bn(model, seed=1)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    fused = reparameterize(model)
    assert is_reparameterized(fused) and not is_reparameterized(model)  # the input model is untouched
    assert _max_rel_diff(fused(x), expected) <= 1e-5
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


@pytest.mark.parametrize("name", ["repvgg_a0", "mobileone_s0", "fastvit_t8"])
def test_timm_reparameterisable_models(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    _randomise_bn(model, seed=2)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    fused = reparameterize(model)
    assert _max_rel_diff(fused(x), expected) <= 1e-5  # relative: random-init activations can be huge
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())
