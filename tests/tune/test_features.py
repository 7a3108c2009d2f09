"""Linear-probe feature caching gives the probe a naive per-epoch probe would get; fit() input errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from potpourri.core.errors import PotpourriError
from potpourri.tune.features import extract_features
from potpourri.tune.trainer import fit
from tests.tune.tune_testkit import colour_data, tiny_model


def test_extract_features_returns_the_classifier_input_in_eval_mode():
    model = tiny_model()
    data = colour_data(20)
    cached = extract_features(model, data, model.classifier, batch_size=8)
    trunk = copy.deepcopy(model)
    trunk.classifier = nn.Identity()
    with torch.no_grad():
        expected = trunk.eval()(data.tensors[0])  # (N, 16)
    assert cached.tensors[0].shape == (20, 16)
    torch.testing.assert_close(cached.tensors[0], expected)
    assert torch.equal(cached.tensors[1], data.tensors[1])
    assert model.training  # the caller's mode is restored


def test_cached_linear_probe_matches_the_naive_probe(tmp_path):
    cfg = {"epochs": 3, "batch_size": 8, "lr": 0.05, "progress": False}
    train_set, val_set = colour_data(32), colour_data(16, seed=3)
    naive = fit(tiny_model(), train_set, val_set, "linear", cache_features=False, **cfg)
    cached = fit(tiny_model(), train_set, val_set, "linear", cache_features=True, out=tmp_path / "run", **cfg)
    torch.testing.assert_close(cached.model.classifier.weight, naive.model.classifier.weight, atol=1e-5, rtol=0)
    assert cached.val_acc == naive.val_acc
    assert cached.plan["trainable_params"] == 16 * 3 + 3
    # the cached run still saves the whole model, not only the head it trained
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "run" / "model.safetensors"))) == set(cached.model.state_dict())


def test_fit_rejects_one_class_unknown_options_and_misplaced_blocks():
    one_class = TensorDataset(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long))
    with pytest.raises(PotpourriError, match="single class"):
        fit(tiny_model(), one_class)
    with pytest.raises(PotpourriError, match="unknown training option 'epoch'; valid options: augment, batch_size"):
        fit(tiny_model(), colour_data(), epoch=3)
    with pytest.raises(PotpourriError, match="blocks= only applies to strategies 'subtuning' and 'siamese-subtuning'"):
        fit(tiny_model(), colour_data(), strategy="linear", blocks=["blocks.0.0"])


@pytest.mark.parametrize("blocks", [["blocks.0.1"], ["blocks.0.1", "neck"]])
def test_subtuning_on_cached_prefix_activations_gives_the_uncached_weights(tmp_path, blocks):
    cfg = {"epochs": 2, "batch_size": 8, "lr": 5e-2, "seed": 1, "progress": False, "optimizer": "sgd"}
    train_set, val_set = colour_data(24), colour_data(12, seed=3)
    base = tiny_model()
    naive = fit(copy.deepcopy(base), train_set, val_set, "subtuning", blocks=blocks, cache_features=False, **cfg)
    cached = fit(copy.deepcopy(base), train_set, val_set, "subtuning", blocks=blocks, cache_features=True,
                 out=tmp_path / "run", **cfg)  # fmt: skip
    expected = naive.model.state_dict()
    for name, actual in cached.model.state_dict().items():
        torch.testing.assert_close(actual, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    moved = [k for k, v in cached.model.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert moved and all(k.startswith(("blocks.0.1", "conv_head", "bn2", "classifier")) for k in moved)
    assert cached.val_acc == naive.val_acc
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "run" / "model.safetensors"))) == set(base.state_dict())


def test_cached_subtuning_refuses_what_would_make_the_prefix_change():
    with pytest.raises(PotpourriError, match="needs bn='eval'"):
        fit(tiny_model(), colour_data(), strategy="subtuning", blocks=["blocks.0.1"], cache_features=True, bn="train")
    with pytest.raises(PotpourriError, match="cannot be combined with cache_features"):
        fit(tiny_model(), colour_data(), strategy="subtuning", blocks=["blocks.0.1"], cache_features=True, augment=True)
    with pytest.raises(PotpourriError, match="only applies to strategies 'linear' and 'subtuning'"):
        fit(tiny_model(), colour_data(), strategy="full-adamw", cache_features=True)
