"""Layer selection: the greedy search finds the one block that can fix the task; proxies compute what they claim."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from potpourri.core.errors import PotpourriError
from potpourri.models.blocks import block_map
from potpourri.tune.layer_select import finetuning_profile, greedy_select, proxy_scores, rank_correlation
from tests.tune.tune_testkit import colour_data, tiny_model


class PlantedBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, D)
        return torch.relu(self.fc(x))


class PlantedNet(nn.Module):
    """Identity blocks except block ``k``, which outputs a constant: only tuning block k can recover the input."""

    def __init__(self, *, width: int = 6, depth: int = 4, k: int = 2, num_classes: int = 2) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.blocks = nn.Sequential(*[PlantedBlock(width) for _ in range(depth)])
        self.head = nn.Linear(width, num_classes)
        with torch.no_grad():
            for layer in [self.stem, *(b.fc for b in self.blocks)]:
                layer.weight.copy_(torch.eye(width))  # inputs are >= 0, so relu(I x) = x
                layer.bias.zero_()
            self.blocks[k].fc.weight.zero_()  # the planted block: relu(0 x + 1) = 1 whatever the input
            self.blocks[k].fc.bias.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, K)
        return self.head(self.blocks(torch.relu(self.stem(x))))


def planted_data(n: int = 90, width: int = 6, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, width, generator=gen)  # (N, D) in [0, 1)
    score = x @ torch.randn(width, generator=gen)
    return TensorDataset(x, (score > score.median()).long())  # balanced, linearly separable in the input


@pytest.mark.parametrize("planted", [1, 3])
def test_greedy_finds_the_planted_block_and_stops_on_small_gain(planted):
    torch.manual_seed(0)
    model = PlantedNet(k=planted)
    assert list(block_map(model)) == ["stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    cfg = {"epochs": 20, "batch_size": 15, "lr": 0.1, "seed": 0}
    selection = greedy_select(model, planted_data(), folds=3, epsilon=0.2, max_blocks=2, **cfg)
    first = selection.rounds[0].scores
    assert selection.chosen == [f"blocks.{planted}"], first
    assert first[f"blocks.{planted}"] >= 0.8 and selection.linear_probe <= 0.6
    assert max(v for k, v in first.items() if k != f"blocks.{planted}") <= 0.6  # no other block can fix the task
    assert len(selection.rounds) == 2 and selection.stop_reason.startswith("best gain")
    assert selection.trainings == 3 * (1 + 5 + 4)


def test_greedy_respects_the_parameter_budget_and_rejects_unknown_blocks():
    model = PlantedNet(k=2)
    one_block = 6 * 6 + 6
    selection = greedy_select(model, planted_data(), folds=3, max_params=one_block - 1, epochs=1, batch_size=30)
    assert selection.chosen == [] and selection.stop_reason.startswith("no candidate fits")
    with pytest.raises(PotpourriError, match=r"unknown block 'blocks\.7'; valid blocks: stem, blocks\.0"):
        greedy_select(model, planted_data(), candidates=["blocks.7"], epochs=1)


def test_grad_ratio_proxy_equals_the_hand_computed_ratio_and_is_zero_upstream_of_the_planted_block():
    model = PlantedNet(k=2)
    data = planted_data(32)
    scores = proxy_scores(model, data, method="grad_ratio", batches=1, batch_size=32)
    model.zero_grad()
    nn.functional.cross_entropy(model(data.tensors[0]), data.tensors[1]).backward()
    fc = model.blocks[3].fc
    grad = torch.cat([fc.weight.grad.flatten(), fc.bias.grad])
    weight = torch.cat([fc.weight.detach().flatten(), fc.bias.detach()])
    assert scores["blocks.3"] == pytest.approx((grad.norm() / weight.norm()).item(), rel=1e-5)
    assert scores["stem"] == scores["blocks.0"] == scores["blocks.1"] == 0.0  # the constant block cuts the gradient
    assert scores["blocks.2"] > 0


def test_fisher_proxy_is_the_mean_squared_gradient_and_leaves_the_model_untouched():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = colour_data(16)
    scores = proxy_scores(model, data, method="fisher", batches=1, batch_size=16)
    reference = tiny_model().eval()
    nn.functional.cross_entropy(reference(data.tensors[0]), data.tensors[1]).backward()
    grads = torch.cat([p.grad.flatten() for p in reference.classifier.parameters()])
    assert scores["head"] == pytest.approx(grads.pow(2).mean().item(), rel=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(PotpourriError, match="unknown proxy 'snip'; choose one of grad_ratio, fisher"):
        proxy_scores(model, data, method="snip")


def test_finetuning_profile_peaks_at_the_planted_block():
    torch.manual_seed(0)
    candidates = ["blocks.0", "blocks.1", "blocks.2"]
    cfg = {"epochs": 20, "batch_size": 15, "lr": 0.1}
    profile = finetuning_profile(PlantedNet(k=1), planted_data(), candidates=candidates, folds=3, **cfg)
    assert max(profile, key=profile.get) == "blocks.1" and profile["blocks.1"] - profile["blocks.0"] >= 0.25


def test_rank_correlation_is_spearman_over_shared_blocks():
    reference = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    assert rank_correlation({"a": 0.9, "b": 0.7, "c": 0.8, "d": 0.1, "extra": 5.0}, reference) == pytest.approx(0.8)
    assert rank_correlation({"a": 1, "b": 2, "c": 3, "d": 4}, reference) == pytest.approx(-1.0)
    with pytest.raises(PotpourriError, match="needs 2 shared blocks, got 1"):
        rank_correlation({"a": 1.0}, reference)


def _texture_crops(per_class: int = 8, size: int = 48, seed: int = 0) -> TensorDataset:
    """Crops of three skimage texture photos (brick, grass, gravel), scaled to [-1, 1] like Lite0's inputs."""
    import numpy as np
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(["brick", "grass", "gravel"]):
        photo = getattr(skdata, name)()
        photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo
        for _ in range(per_class):
            y, x = rng.integers(0, photo.shape[0] - size, 2)
            crop = torch.tensor(photo[y : y + size, x : x + size]).permute(2, 0, 1).float()  # (3, S, S)
            images.append(crop / 127.5 - 1)
            labels.append(label)
    return TensorDataset(torch.stack(images), torch.tensor(labels))


@pytest.mark.slow
def test_greedy_finds_a_planted_block_in_pretrained_efficientnet_lite0():
    import potpourri

    torch.manual_seed(0)
    model = potpourri.create_model("efficientnet_lite0", pretrained=True, num_classes=3)  # weights ship in a core dep
    with torch.no_grad():
        model.blocks[5][0].conv_pwl.weight.zero_()  # block 5.0 has no residual: it now outputs a constant
    candidates = ["blocks.4.2", "blocks.5.0", "blocks.5.1"]
    selection = greedy_select(
        model, _texture_crops(), candidates=candidates, folds=2, max_blocks=1, epochs=8, batch_size=4, lr=3e-3
    )
    scores = selection.rounds[0].scores
    assert selection.chosen == ["blocks.5.0"], scores
    assert scores["blocks.5.0"] >= 0.75 and scores["blocks.4.2"] <= 0.5 and scores["blocks.5.1"] <= 0.5
