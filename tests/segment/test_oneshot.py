"""One-shot segmentation: WAS math, the SD attention recorder on a tiny random UNet, planted one-shot tasks, I/O."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from potpourri.core.errors import PotpourriError
from potpourri.core.metrics import mean_iou
from potpourri.segment.features import accumulated_self_attention
from potpourri.segment.oneshot import (
    DenseFeatureSource,
    MultiScaleFeatures,
    OneShotConfig,
    OneShotSegmenter,
    read_mask,
    rescale_to_range,
)
from potpourri.segment.oneshot_sd import AttentionStore, StableDiffusionSource, install_attention_recorders

SIZE = 64


# ----------------------------------------------------------------------------------------------- WAS math
def test_was_with_identity_self_attention_is_the_cross_attention() -> None:
    cross = torch.rand(2, 3, 4, 5)
    eye = torch.eye(20).expand(2, 20, 20)
    assert torch.allclose(accumulated_self_attention(cross, eye), cross)


def test_was_with_block_diagonal_self_attention_is_the_block_mean() -> None:
    # pixels 0-7 (top two rows) attend uniformly to each other, pixels 8-15 likewise
    cross = torch.rand(1, 2, 4, 4)
    attention = torch.zeros(1, 16, 16)
    attention[0, :8, :8] = 1 / 8
    attention[0, 8:, 8:] = 1 / 8
    was = accumulated_self_attention(cross, attention).reshape(1, 2, 16)
    flat = cross.reshape(1, 2, 16)
    assert torch.allclose(was[..., :8], flat[..., :8].mean(-1, keepdim=True).expand(1, 2, 8))
    assert torch.allclose(was[..., 8:], flat[..., 8:].mean(-1, keepdim=True).expand(1, 2, 8))


def test_was_equals_an_explicit_double_loop() -> None:
    g = torch.Generator().manual_seed(0)
    cross = torch.rand(2, 3, 3, 2, generator=g)
    attention = torch.softmax(torch.randn(2, 6, 6, generator=g), -1)
    expected = torch.zeros(2, 3, 6)
    for b in range(2):
        for k in range(3):
            for x in range(6):
                expected[b, k, x] = sum(cross[b, k].flatten()[j] * attention[b, x, j] for j in range(6))
    assert torch.allclose(accumulated_self_attention(cross, attention), expected.reshape(2, 3, 3, 2), atol=1e-6)
    with pytest.raises(PotpourriError, match="does not match"):
        accumulated_self_attention(cross, attention[:, :5, :5])


def test_rescale_to_range_matches_the_reference_range() -> None:
    maps, reference = torch.rand(2, 3, 5, 5) * 7 - 2, torch.rand(2, 3, 5, 5) * 0.3 + 0.1
    out = rescale_to_range(maps, reference)
    assert torch.allclose(out.amin((-2, -1)), reference.amin((-2, -1)), atol=1e-6)
    assert torch.allclose(out.amax((-2, -1)), reference.amax((-2, -1)), atol=1e-6)
    assert torch.equal(out.flatten(2).argsort(-1), maps.flatten(2).argsort(-1))  # order kept: an affine map


# ----------------------------------------------------------------------------------------------- tiny SD
sd = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers (dev install)")
CROSS = ("mid_block.attentions.0", "up_blocks.1.attentions.0")  # 8² and 16² on a 16² latent
SELF = ("up_blocks.1.attentions.0", "up_blocks.1.attentions.1")


def tiny_unet() -> nn.Module:
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()


def tiny_prompt_encoder():
    g = torch.Generator().manual_seed(1)
    table = {"": torch.randn(1, 6, 12, generator=g)}

    def encode(text: str) -> torch.Tensor:
        if text not in table:
            table[text] = torch.randn(1, 6, 12, generator=g)
        return table[text]

    return encode


def tiny_sd_source(**kwargs) -> StableDiffusionSource:
    import diffusers

    return StableDiffusionSource(
        tiny_unet(),
        None,
        diffusers.DDPMScheduler(num_train_timesteps=1000),
        tiny_prompt_encoder(),
        cross_layers=CROSS,
        self_layers=SELF,
        resolution=16,
        **kwargs,
    )


def _inputs(batch: int = 2):
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randn(batch, 6, 12, generator=g)


@sd
@torch.no_grad()
def test_recording_processor_output_equals_the_default_processors() -> None:
    from diffusers.models.attention_processor import AttnProcessor

    unet, (latents, context) = tiny_unet(), _inputs()
    default = unet(latents, 10, encoder_hidden_states=context).sample  # AttnProcessor2_0 (SDPA)
    unet.set_attn_processor(AttnProcessor())
    classic = unet(latents, 10, encoder_hidden_states=context).sample
    store = AttentionStore()
    install_attention_recorders(unet, store, cross_layers=CROSS, self_layers=SELF)
    recorded = unet(latents, 10, encoder_hidden_states=context).sample
    assert torch.equal(recorded, classic)  # same arithmetic as AttnProcessor, bit for bit
    assert torch.allclose(recorded, default, atol=1e-5)
    assert len(store.probs) == len(CROSS) + len(SELF)


@sd
@torch.no_grad()
def test_recorded_probabilities_sum_to_one_and_equal_softmax_qk() -> None:
    unet, (latents, context) = tiny_unet(), _inputs()
    store = AttentionStore()
    names = install_attention_recorders(unet, store, cross_layers=CROSS, self_layers=SELF)
    captured = {}
    for name in names:
        module = unet.get_submodule(name)
        module.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: captured.__setitem__(
                name, (args[0], kwargs.get("encoder_hidden_states"))
            ),
            with_kwargs=True,
        )
    unet(latents, 10, encoder_hidden_states=context)
    for name in names:
        probs = store.probs[name]  # (B, heads, N_q, N_k)
        assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5)
        module = unet.get_submodule(name)
        hidden, encoder = captured[name]
        keys_from = hidden if encoder is None else encoder
        assert (name.endswith("attn2")) == (encoder is not None) == (name in store.cross_layers)
        q, k = module.to_q(hidden), module.to_k(keys_from)  # (B, N, heads·d)
        b, heads = q.shape[0], module.heads
        q = q.view(b, q.shape[1], heads, -1).transpose(1, 2)
        k = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
        expected = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        assert torch.allclose(probs, expected, atol=1e-5), name


@sd
def test_sd_source_maps_shapes_was_and_gradients_reach_only_the_tokens() -> None:
    source = tiny_sd_source()
    before = {k: v.clone() for k, v in source.unet.state_dict().items()}
    prepared = source.prepare(torch.rand(2, 3, 16, 16))
    tokens = nn.Parameter(source.init_tokens(3, torch.Generator().manual_seed(0)))  # K = 3: background + 2
    assert tokens.shape == (2, 12)
    maps = source.attend(prepared, tokens, train=True, generator=torch.Generator().manual_seed(0))
    assert maps.cross.shape == maps.cross_logits.shape == (2, 3, 16, 16)
    assert maps.self_attention.shape == (2, 256, 256)
    assert torch.allclose(maps.cross.sum(1), torch.ones(2, 16, 16), atol=1e-5)  # softmax over classes
    was = maps.accumulated
    assert was.shape == (2, 3, 16, 16)
    independent = torch.einsum("bkj,bxj->bkx", maps.cross.flatten(2), maps.self_attention).reshape(2, 3, 16, 16)
    assert torch.allclose(was, independent, atol=1e-6)
    loss = maps.cross_logits.square().mean() + was.square().mean() + maps.aux_loss
    loss.backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0 and torch.isfinite(tokens.grad).all()
    assert all(p.grad is None and not p.requires_grad for p in source.unet.parameters())
    assert all(torch.equal(v, before[k]) for k, v in source.unet.state_dict().items())


def test_sd_store_averages_heads_and_layers_and_resizes() -> None:
    store = AttentionStore()
    coarse = torch.softmax(torch.randn(1, 2, 4, 5), -1)  # a 2x2 layer, 2 heads, 5 tokens
    fine = torch.softmax(torch.randn(1, 2, 16, 5), -1)  # a 4x4 layer
    store.record("a.attn2", coarse, coarse.log(), cross=True)
    store.record("b.attn2", fine, fine.log(), cross=True)
    _, probs = store.cross_maps(3, (4, 4), (4, 4))
    up = torch.nn.functional.interpolate(
        coarse.mean(1)[..., :3].transpose(1, 2).reshape(1, 3, 2, 2), size=(4, 4), mode="bilinear"
    )
    expected = (up + fine.mean(1)[..., :3].transpose(1, 2).reshape(1, 3, 4, 4)) / 2
    assert torch.allclose(probs, expected, atol=1e-6)


@sd
def test_sd_segmenter_fits_tokens_and_keeps_the_unet() -> None:
    source = tiny_sd_source()
    before = {k: v.clone() for k, v in source.unet.state_dict().items()}
    image = np.zeros((16, 16, 3), np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:10, 4:10], image[4:10, 4:10] = 2, 200
    model = OneShotSegmenter(OneShotConfig(steps=3, image_size=16, loss_size=16), source=source)
    model.fit([image], [mask])
    assert model.embeddings.shape == (1, 12) and model.class_ids == [0, 2]
    assert set(model.history[-1]) == {"loss", "ce", "was", "sd"}
    assert set(np.unique(model.predict([image]))) <= {0, 2}
    assert all(torch.equal(v, before[k]) for k, v in source.unet.state_dict().items())


@sd
def test_sd_errors_are_one_line_with_the_fix(tmp_path) -> None:
    with pytest.raises(PotpourriError, match="huggingface-cli download stabilityai/stable-diffusion-2-1-base"):
        StableDiffusionSource.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(PotpourriError, match=r"no attn2 attention under 'up_blocks\.7'"):
        install_attention_recorders(tiny_unet(), AttentionStore(), cross_layers=("up_blocks.7",), self_layers=())


@sd
def test_sd_source_loads_a_diffusers_folder_from_disk(tmp_path) -> None:
    """The real loading path (no hub): a tiny UNet, VAE, scheduler, CLIP tokenizer and text encoder saved to disk."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    blocks = {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 4}
    diffusers.UNet2DConditionModel(
        sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=4,
        **blocks,
    ).save_pretrained(tmp_path / "unet")
    diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, **blocks
    ).save_pretrained(tmp_path / "vae")
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "scheduler")
    vocab = {
        "<|startoftext|>": 0,
        "<|endoftext|>": 1,
        "p": 2,
        "a": 3,
        "r": 4,
        "t</w>": 5,
        "pa": 6,
        "par": 7,
        "part</w>": 8,
    }
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\np a\npa r\npar t</w>\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8)
    assert tokenizer("part part").input_ids == [0, 8, 8, 1]
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    text = CLIPTextConfig(
        vocab_size=9, hidden_size=12, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    CLIPTextModel(text).save_pretrained(tmp_path / "text_encoder")
    layers = ("up_blocks.1.attentions.0",)
    source = StableDiffusionSource.from_pretrained(tmp_path, resolution=32, cross_layers=layers, self_layers=layers)
    prepared = source.prepare(torch.rand(1, 3, 32, 32))
    assert prepared["latents"].shape == (1, 4, 16, 16) and source.vae.decoder is None
    tokens = source.init_tokens(3, torch.Generator())  # the text encoder's outputs at the two "part" positions
    assert torch.equal(tokens, source.encode_prompt("part part")[0, 1:3])
    maps = source.attend(prepared, tokens, train=False, generator=torch.Generator().manual_seed(0))
    assert maps.cross.shape == maps.accumulated.shape == (1, 3, 16, 16)


# ----------------------------------------------------------------------------------------------- planted task
COLOURS = {0: (40, 60, 200), 1: (220, 40, 30), 2: (40, 200, 60)}


def planted_image(seed: int, classes: tuple[int, ...] = (1, 2)) -> tuple[np.ndarray, np.ndarray]:
    """Blue noisy background, a red and a green rectangle at seeded places; the mask is exact."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for cls in classes:
        h, w = rng.integers(12, 24, 2)
        top, left = rng.integers(0, SIZE - h), rng.integers(0, SIZE - w)
        mask[top : top + h, left : left + w] = cls
    image = np.asarray([COLOURS[c] for c in range(3)], np.float32)[mask]
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


class ColourFeatures(nn.Module):
    """A frozen stand-in backbone: a fixed 1x1 colour projection, pooled to a stride-2 grid."""

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Conv2d(3, 8, 1)
        with torch.no_grad():
            self.project.weight.copy_(torch.randn(8, 3, 1, 1, generator=torch.Generator().manual_seed(0)))
            self.project.bias.zero_()
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.project(x))  # (B, 8, S/2, S/2)


@pytest.fixture(scope="module")
def planted_source() -> DenseFeatureSource:
    return DenseFeatureSource(ColourFeatures(), temperature=0.1)


def _config(**kwargs) -> OneShotConfig:
    return OneShotConfig(**{"image_size": SIZE, "loss_size": SIZE, "steps": 60, "batch_size": 4, **kwargs})


@pytest.mark.parametrize("method", ["slime", "prototype"])
def test_one_shot_on_a_planted_task_is_near_perfect(planted_source, method: str) -> None:
    support, support_mask = planted_image(0)
    queries = [planted_image(seed) for seed in range(1, 6)]
    model = OneShotSegmenter(_config(method=method), source=planted_source).fit([support], [support_mask])
    predicted = model.predict([q for q, _ in queries])
    truth = np.stack([m for _, m in queries])
    assert predicted.shape == truth.shape and predicted.dtype == np.uint8
    assert mean_iou(predicted, truth, 3) > 0.9


def test_slime_loss_decreases_and_ids_map_back(planted_source) -> None:
    image, mask = planted_image(3)
    mask = np.where(mask == 2, 5, mask).astype(np.uint8)  # class ids need not be contiguous
    model = OneShotSegmenter(_config(), source=planted_source).fit([image], [mask])
    assert model.class_ids == [0, 1, 5]
    assert model.history[-1]["loss"] < 0.5 * model.history[0]["loss"]
    assert set(np.unique(model.predict([image]))) == {0, 1, 5}


def test_k_shot_pools_the_loss_over_images(planted_source) -> None:
    # each support image carries one class; only their union covers both
    (a, mask_a), (b, mask_b) = planted_image(0, classes=(1,)), planted_image(1, classes=(2,))
    model = OneShotSegmenter(_config(), source=planted_source).fit([a, b], [mask_a, mask_b])
    assert model.class_ids == [0, 1, 2]
    queries = [planted_image(seed) for seed in range(6, 9)]
    assert mean_iou(model.predict([q for q, _ in queries]), np.stack([m for _, m in queries]), 3) > 0.85


def test_only_the_embeddings_train_and_the_backbone_stays_bit_identical() -> None:
    import timm

    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = DenseFeatureSource(MultiScaleFeatures(backbone, layers=(1, 2, 4), grid_layer=2))
    before = {k: v.clone() for k, v in source.state_dict().items()}
    assert source.token_dim == 24 + 40 + 112
    assert not any(p.requires_grad for p in source.parameters())
    image, mask = planted_image(0)
    model = OneShotSegmenter(_config(steps=5), source=source)
    start = source.init_tokens(3, torch.Generator().manual_seed(0))
    model.fit([image], [mask])
    after = source.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(model.embeddings, start)  # the embeddings did move
    prepared = source.prepare(torch.rand(1, 3, SIZE, SIZE))
    assert prepared["features"].shape == (1, 176, SIZE // 8, SIZE // 8)


def test_same_seed_same_result_other_seed_other_embeddings(planted_source) -> None:
    image, mask = planted_image(2)
    runs = [OneShotSegmenter(_config(steps=10, seed=s), source=planted_source).fit([image], [mask]) for s in (0, 0, 1)]
    assert torch.equal(runs[0].embeddings, runs[1].embeddings)
    assert np.array_equal(runs[0].predict([image]), runs[1].predict([image]))
    assert not torch.equal(runs[0].embeddings, runs[2].embeddings)


@pytest.mark.parametrize("method", ["slime", "prototype"])
def test_save_load_round_trip(tmp_path, planted_source, method: str) -> None:
    image, mask = planted_image(4)
    model = OneShotSegmenter(_config(method=method, steps=10), source=planted_source).fit([image], [mask])
    model.save(tmp_path)
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    assert metadata["class_ids"] == [0, 1, 2] and metadata["config"]["method"] == method
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp files
    loaded = OneShotSegmenter.load(tmp_path, source=planted_source)
    queries = [planted_image(s)[0] for s in (7, 8)]
    assert loaded.config == model.config
    assert torch.equal(loaded.scores(queries), model.scores(queries))
    with pytest.raises(PotpourriError, match="no one-shot model"):
        OneShotSegmenter.load(tmp_path / "missing")


def test_bad_inputs_raise_one_line_errors(tmp_path, planted_source) -> None:
    image, mask = planted_image(0)
    model = OneShotSegmenter(_config(steps=1), source=planted_source)
    with pytest.raises(PotpourriError, match="masks must match their image"):
        model.fit([image], [mask[:32]])
    with pytest.raises(PotpourriError, match=r"class ids \[4\] are absent from the support masks"):
        OneShotSegmenter(_config(steps=1, class_ids=(1, 2, 4)), source=planted_source).fit([image], [mask])
    with pytest.raises(PotpourriError, match=r"class ids \[2\] not in class_ids"):
        OneShotSegmenter(_config(steps=1, class_ids=(1,)), source=planted_source).fit([image], [mask])
    with pytest.raises(PotpourriError, match="one mask per image"):
        model.fit([image, image], [mask])
    dot = np.zeros_like(mask)
    dot[5, 5] = 1  # one pixel, lost by a nearest resize to 16 px
    with pytest.raises(PotpourriError, match=r"vanish when masks are resized to loss_size=16"):
        OneShotSegmenter(_config(loss_size=16), source=planted_source).fit([image], [dot])
    with pytest.raises(PotpourriError, match="only background"):
        model.fit([image], [np.zeros_like(mask)])
    with pytest.raises(PotpourriError, match="not fitted"):
        model.predict([image])
    Image.fromarray(image).save(tmp_path / "rgb_mask.png")
    with pytest.raises(PotpourriError, match="not a class-index image"):
        read_mask(tmp_path / "rgb_mask.png")
    with pytest.raises(PotpourriError, match="unknown one-shot method"):
        OneShotSegmenter(_config(method="sam"))


def test_cli_writes_masks_panels_and_report(tmp_path) -> None:
    from potpourri.cli import main

    paths = {}
    for name, seed in (("support", 0), ("query_a", 1), ("query_b", 2)):
        image, mask = planted_image(seed)
        Image.fromarray(image).save(tmp_path / f"{name}.png")
        Image.fromarray(mask).save(tmp_path / f"{name}_mask.png")
        paths[name] = tmp_path / f"{name}.png"
    out = tmp_path / "run"
    argv = ["inspect", "oneshot", str(paths["query_a"]), str(paths["query_b"]), "--out", str(out)]
    argv += ["--support", str(paths["support"]), "--support-mask", str(tmp_path / "support_mask.png")]
    argv += ["--truth", str(tmp_path / "query_a_mask.png"), "--truth", str(tmp_path / "query_b_mask.png")]
    argv += ["--method", "prototype", "--image-size", str(SIZE)]
    assert main(argv) == 0
    masks = sorted((out / "masks").glob("*.png"))
    assert len(masks) == 2 and np.asarray(Image.open(masks[0])).shape == (SIZE, SIZE)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["miou"] > 0.5  # real Lite0 features on two flat colours
    rows = (out / "predictions.csv").read_text().splitlines()
    assert len(rows) == 1 + summary["images"] and rows[0].startswith("image,pixels_")
    assert len(list((out / "images").glob("*.png"))) == 2 and "IoU against --truth" in (out / "report.html").read_text()
    again = ["inspect", "oneshot", str(paths["query_a"]), "--load", str(out / "model"), "--out", str(tmp_path / "r2")]
    assert main(again) == 0
    assert np.array_equal(
        np.asarray(Image.open(next((tmp_path / "r2" / "masks").glob("*.png")))), np.asarray(Image.open(masks[0]))
    )
