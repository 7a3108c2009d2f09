"""`potpourri reproduce frozen-lm`: paired summary arithmetic, and one smoke run of the real code path."""

from __future__ import annotations

import pytest
import torch

from potpourri.papers.frozen_lm import FrozenLMConfig, build_arm, reproduce_frozen_lm, summarise


def test_summary_means_and_paired_deltas() -> None:
    def row(arm, seed, acc):
        return {
            "arm": arm,
            "seed": seed,
            "status": "ok",
            "clean_acc": acc,
            "corrupt_acc": acc / 2,
            "seconds": 1.0,
            "trainable": 10,
            "frozen": 5,
        }

    rows = [row("vit", 0, 0.5), row("vit", 1, 0.7), row("+mlp", 0, 0.6), row("+mlp", 1, 0.6)]
    rows.append({"arm": "+mlp", "seed": 2, "status": "diverged", "seconds": 1.0, "trainable": 10, "frozen": 5})
    table = {e["arm"]: e for e in summarise(rows, ("vit", "+mlp"))}
    assert table["vit"]["clean_acc"] == "0.600±0.141"  # mean 0.6, sample std sqrt(0.02)
    assert table["+mlp"]["clean_acc_delta"] == "+0.000"  # (+0.1 - 0.1) / 2, paired by seed
    assert table["+mlp"]["corrupt_acc_delta"] == "+0.000" and table["+mlp"]["diverged"] == 1


def test_arms_share_the_vit_initialisation_and_freeze_the_right_parts() -> None:
    cfg = FrozenLMConfig(image_size=16, embed_dim=32, depth=1, num_heads=2)
    cache: dict = {}
    vit = build_arm("vit", cfg, 10, 0, cache)
    lm = build_arm("+minilm-last", cfg, 10, 0, cache)
    trainable = build_arm("+minilm-last-trainable", cfg, 10, 0, cache)
    for name, param in vit.named_parameters():
        assert torch.equal(param, dict(lm.named_parameters())[name]), name  # same seed, same ViT
    assert not any(p.requires_grad for p in lm.lm_block.lm.parameters())
    assert all(p.requires_grad for p in trainable.lm_block.lm.parameters())
    assert (
        not build_arm("vit", cfg, 10, 1, cache).vit.blocks[0].attn.qkv.weight.equal(vit.vit.blocks[0].attn.qkv.weight)
    )


@pytest.mark.slow
def test_smoke_run_writes_a_table_with_every_arm(tmp_path) -> None:
    cfg = FrozenLMConfig(
        arms=("vit", "+mlp", "+tiny-llama-random"),
        n_train=20,
        n_test=10,
        image_size=16,
        embed_dim=32,
        depth=1,
        num_heads=2,
        epochs=1,
        batch_size=10,
        seeds=(0, 1),
        corruptions=("contrast",),
        iou_images=5,
    )
    run = reproduce_frozen_lm(cfg, out=str(tmp_path / "run"))
    table = (run.path / "results.md").read_text()
    for arm in cfg.arms:
        assert f"| {arm} |" in table
    summary = run.read_summary()
    assert len(summary["runs"]) == 6 and all(r["status"] == "ok" for r in summary["runs"])
    assert all(0.0 <= r["iou_cls_attn"] <= 1.0 for r in summary["runs"])


def test_shuffled_arm_keeps_each_tensors_values_but_not_their_order() -> None:
    from potpourri.papers import frozen_lm as study

    cfg = FrozenLMConfig(image_size=16, embed_dim=32, depth=1, num_heads=2)
    cache: dict = {}
    study.ARMS["_test-shuffled"] = ("minilm_l6", -1, False, False)
    study.SHUFFLED.add("_test-shuffled")
    try:
        plain = build_arm("+minilm-last", cfg, 10, 0, cache).lm_block.lm
        shuffled = build_arm("_test-shuffled", cfg, 10, 0, cache).lm_block.lm
    finally:
        del study.ARMS["_test-shuffled"]
        study.SHUFFLED.discard("_test-shuffled")
    for (name, a), b in zip(plain.named_parameters(), shuffled.parameters(), strict=True):
        assert torch.equal(a.flatten().sort().values, b.flatten().sort().values), name  # same multiset of values
        if a.numel() > 1 and a.unique().numel() > 1:
            assert not torch.equal(a, b), name
