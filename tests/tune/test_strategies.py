"""Which parameters each strategy trains, that frozen ones stay bit-identical, block maps, BN policy, errors."""

from __future__ import annotations

import copy
import sys

import pytest
import timm
import torch
import torch.nn as nn

from potpourri.core.errors import PotpourriError
from potpourri.models.blocks import block_map
from potpourri.tune.strategies import STRATEGIES, apply_bn_policy, get_strategy, recalibrate_bn
from potpourri.tune.trainer import TuneConfig, train
from tests.tune.tune_testkit import TINY_BLOCKS, colour_data, tiny_model

ALL = "*"
# Independent expectation: the parameter-name prefixes each strategy must train on TinyNet.
EXPECTED_PREFIXES = {
    "linear": ["classifier."],
    "full-adamw": [ALL],
    "full-sgd": [ALL],
    "sgd-freeze-embed": ["blocks.", "conv_head.", "bn2.", "classifier."],
    "subtuning": ["blocks.0.1.", "classifier."],
    "siamese-subtuning": ["tuned.blocks.0.1.", "head."],  # never the frozen copy
    "layer-decay": [ALL],
    "lora": [".lora_", "classifier."],
    "visual-prompt": ["prompt.", "mapping."],
}
KWARGS = {"subtuning": {"blocks": ["blocks.0.1"]}, "siamese-subtuning": {"blocks": ["blocks.0.1"]}}


def _expected(names: list[str], strategy: str) -> set[str]:
    prefixes = EXPECTED_PREFIXES[strategy]
    if prefixes == [ALL]:
        return set(names)
    return {n for n in names if any(n.startswith(p) or (p.startswith(".") and p in n) for p in prefixes)}


def test_strategy_table_covers_every_strategy():
    assert set(EXPECTED_PREFIXES) == set(STRATEGIES)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_trains_exactly_its_params_and_frozen_stay_bit_identical(name):
    if name == "lora":
        pytest.importorskip("peft")  # the [lora] extra
    model = tiny_model()
    if name == "visual-prompt":  # AutoVP wraps a frozen source classifier: prompt -> source -> label mapping
        from potpourri.tune.visual_prompt import VPConfig, build_visual_prompt

        model = build_visual_prompt(tiny_model(num_classes=12), 3, VPConfig("fully", width=2), canvas=12)
    if name == "siamese-subtuning":  # a frozen copy beside the tuned one, a head on both
        from potpourri.models.siamese import SiameseSubTuned

        model = SiameseSubTuned(tiny_model(), 3)
    plan = get_strategy(name, **KWARGS.get(name, {})).prepare(model, lr=0.05)
    names = [n for n, _ in model.named_parameters()]
    expected = _expected(names, name)
    assert set(plan.trainable_names) == expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert plan.num_trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert sum(len(g["params"]) for g in plan.param_groups) == len(expected)

    before = copy.deepcopy(model.state_dict())
    cfg = TuneConfig(epochs=1, batch_size=16, lr=0.05, bn="eval", progress=False, grad_clip=None)
    train(model, colour_data(), None, plan, cfg)
    after = model.state_dict()
    for key, value in before.items():
        if key in expected:
            assert not torch.equal(value, after[key]), f"{name}: trainable '{key}' did not move"
        else:  # frozen parameters and, under BN policy 'eval', every BN buffer
            assert torch.equal(value, after[key]), f"{name}: frozen '{key}' changed"


def test_bn_policy_train_updates_stats_of_trained_blocks_only():
    model = tiny_model()
    plan = get_strategy("subtuning", blocks=["blocks.0.1"]).prepare(model, lr=0.05)
    before = copy.deepcopy(model.state_dict())
    train(model, colour_data(), None, plan, TuneConfig(epochs=1, batch_size=16, bn="train", progress=False))
    moved_stats = {k for k, v in model.state_dict().items() if "running" in k and not torch.equal(v, before[k])}
    assert moved_stats == {"blocks.0.1.bn.running_mean", "blocks.0.1.bn.running_var"}


def test_block_map_of_tiny_net():
    bmap = block_map(tiny_model())
    assert list(bmap) == TINY_BLOCKS
    assert bmap["stem"] == ["conv_stem", "bn1"] and bmap["neck"] == ["conv_head", "bn2"]
    assert bmap["head"] == ["classifier"]


def test_block_map_of_efficientnet_lite0_has_16_blocks_and_a_928_param_stem():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=3)
    bmap = block_map(model)
    blocks = [e for e in bmap if e.startswith("blocks.")]
    assert len(blocks) == 16 and blocks[0] == "blocks.0.0" and blocks[-1] == "blocks.6.0"
    assert next(iter(bmap)) == "stem" and list(bmap)[-2:] == ["neck", "head"]
    stem_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("conv_stem.", "bn1.")))
    assert stem_params == 928  # the "embedding layer" of the reference notes (§5)
    plan = get_strategy("sgd-freeze-embed").prepare(model, lr=0.1)
    assert plan.num_total - plan.num_trainable == 928


def test_block_map_of_vit_freeze_embed_keeps_pos_embed_and_cls_token_trainable():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=3)
    bmap = block_map(model)
    assert list(bmap)[:3] == ["stem", "tokens", "blocks.0"] and bmap["stem"] == ["patch_embed"]
    assert len([e for e in bmap if e.startswith("blocks.")]) == 12
    get_strategy("sgd-freeze-embed").prepare(model, lr=0.1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("patch_embed.")}


def test_block_map_of_plain_sequential_and_override():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert list(block_map(model)) == ["0", "2", "head"]
    override = {"bottom": ["0", "2"], "top": ["4"]}
    assert list(block_map(model, override)) == ["bottom", "top"]
    plan = get_strategy("subtuning", blocks=["bottom"], block_map=override).prepare(model, lr=0.1)
    assert plan.trainable_entries == ["bottom", "top"]
    with pytest.raises(PotpourriError, match=r"parameter '4\.weight'"):
        block_map(model, {"bottom": ["0", "2"]})


def test_layer_decay_scales_lr_geometrically_from_the_head():
    plan = get_strategy("layer-decay", decay=0.5).prepare(tiny_model(), lr=1.0)
    lr_of = {g["name"].split("|")[0]: g["lr"] for g in plan.param_groups}
    assert lr_of == {entry: 0.5 ** (len(TINY_BLOCKS) - 1 - i) for i, entry in enumerate(TINY_BLOCKS)}


def test_lora_starts_as_the_original_model_and_adapts_only_pointwise_convs_past_the_stem():
    pytest.importorskip("peft")  # the [lora] extra
    model = tiny_model()
    reference = copy.deepcopy(model).eval()
    plan = get_strategy("lora", rank=2).prepare(model, lr=0.1)
    wrapped = {n.split(".lora_")[0] for n in plan.trainable_names if ".lora_" in n}
    assert wrapped == {"blocks.0.0.conv_pw", "blocks.0.1.conv_pw", "blocks.1.0.conv_pw", "conv_head"}
    images = colour_data(8).tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), reference(images))  # B = 0 at init


def test_unknown_strategy_block_and_optimizer_are_one_line_errors():
    with pytest.raises(PotpourriError, match=r"unknown strategy 'nope'; choose one of linear, .*lora"):
        get_strategy("nope")
    with pytest.raises(PotpourriError, match=r"unknown block 'blocks.9'; valid blocks: stem, blocks.0.0, .*head"):
        get_strategy("subtuning", blocks=["blocks.9"]).prepare(tiny_model(), lr=0.1)
    with pytest.raises(PotpourriError, match="strategy 'full-sgd' uses sgd, not 'adamw'"):
        get_strategy("full-sgd").prepare(tiny_model(), lr=0.1, optimizer="adamw")
    with pytest.raises(PotpourriError, match="unknown BN policy 'frozen'; choose one of eval, train, recalibrate"):
        apply_bn_policy(tiny_model(), "frozen")


@pytest.mark.parametrize("policy", ["eval", "train"])
def test_bn_policy_modes(policy):
    model = tiny_model()
    get_strategy("subtuning", blocks=["blocks.0.1"]).prepare(model, lr=0.1)
    model.train()
    apply_bn_policy(model, policy)
    bn_modes = {n: m.training for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    expected = {n: policy == "train" and n == "blocks.0.1.bn" for n in bn_modes}
    assert bn_modes == expected
    # frozen blocks run wholly in eval mode (their dropout too); the tuned block's dropout stays in train mode
    assert [model.blocks[0][0].drop.training, model.blocks[0][1].drop.training] == [False, True]
    assert model.training and model.blocks[0][1].training


@pytest.mark.parametrize(
    ("arch", "stem", "first_block", "n_blocks"),
    [
        ("resnet10t", ["conv1", "bn1"], "layer1.0", 4),
        ("mobilenetv3_small_050", ["conv_stem", "bn1"], "blocks.0.0", 12),  # stages of 1, 2, 3, 2, 3, 1
        ("convnext_atto", ["stem"], "stages.0", 4),
    ],
)
def test_block_map_of_other_timm_families(arch, stem, first_block, n_blocks):
    model = timm.create_model(arch, pretrained=False, num_classes=3)
    bmap = block_map(model)  # also checks that every parameter sits in exactly one entry
    blocks = [e for e in bmap if e not in ("stem", "neck", "head")]
    assert bmap["stem"] == stem and blocks[0] == first_block and len(blocks) == n_blocks
    assert list(bmap)[-1] == "head" and model.get_submodule(bmap["head"][0]) is model.get_classifier()


def test_recalibrate_sets_trainable_bn_stats_to_the_data_statistics_and_leaves_frozen_ones():
    model = tiny_model()
    get_strategy("sgd-freeze-embed").prepare(model, lr=0.1)  # stem BN frozen, block BNs trainable
    images = colour_data(32).tensors[0]
    model.eval()
    frozen_stats = model.bn1.running_mean.clone()
    with torch.no_grad():
        block_input = torch.relu(model.bn1(model.conv_stem(images)))  # frozen stem in eval mode
        pre_bn = model.blocks[0][0].conv_dw(block_input)  # (B, C, H, W) input of the first trainable BN
    assert recalibrate_bn(model, [(images,)]) == 32
    bn = model.blocks[0][0].bn
    torch.testing.assert_close(bn.running_mean, pre_bn.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, pre_bn.var((0, 2, 3), unbiased=True))
    assert torch.equal(model.bn1.running_mean, frozen_stats)


def test_lora_without_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(PotpourriError, match=r"strategy 'lora' needs peft; run `pip install potpourri\[lora\]`"):
        get_strategy("lora").prepare(tiny_model(), lr=0.1)
