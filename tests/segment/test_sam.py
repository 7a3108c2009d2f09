"""The small SAM on tiny random models: shapes, frozen encoder, prompt encoding formulas, training, checkpoints, CLI."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from potpourri.cli import main
from potpourri.core.errors import PotpourriError
from potpourri.models.sam import (
    Sam,
    SamConfig,
    build_official_sam,
    load_official_checkpoint,
    load_official_into,
    official_variant,
    to_official_state_dict,
)
from potpourri.segment.sam import centre_click, next_click, sam_loss, train_sam

SIZE = 64  # tiny stand-in encoder: stride 16 → a 4×4 image embedding, masks at 16×16


def tiny_sam(seed: int = 0, **overrides) -> Sam:
    torch.manual_seed(seed)
    tiny = {"backbone": "none", "image_size": SIZE, "prompt_dim": 16, "num_heads": 2, "mlp_dim": 32, "iou_hidden": 16}
    config = SamConfig(**(tiny | overrides))
    return Sam(config, backbone=None).eval()


def planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 120, (SIZE, SIZE, 3)).astype(np.uint8)
    region = np.zeros((SIZE, SIZE), bool)
    region[20:40, 12:36] = True
    image[region] = (240, 230, 30)
    return image, region


def test_multimask_and_single_mask_shapes():
    sam = tiny_sam()
    images = torch.randn(2, 3, SIZE, SIZE)
    points, labels = torch.tensor([[[10.0, 20.0]], [[30.0, 5.0]]]), torch.tensor([[1], [1]])
    masks, iou = sam(images, points, labels)
    assert masks.shape == (2, 3, SIZE // 4, SIZE // 4) and iou.shape == (2, 3)
    masks, iou = sam(images, boxes=torch.tensor([[1.0, 2.0, 30.0, 40.0]] * 2), multimask_output=False)
    assert masks.shape == (2, 1, SIZE // 4, SIZE // 4) and iou.shape == (2, 1)


@pytest.mark.parametrize("train_neck", [False, True])
def test_only_prompt_encoder_and_decoder_train(train_neck):
    sam = tiny_sam(train_neck=train_neck, steps=3, batch_size=2)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("image_encoder") else "")
                 for n, p in sam.named_parameters() if p.requires_grad}  # fmt: skip
    expected = {"prompt_encoder", "mask_decoder"} | ({"image_encoder.neck"} if train_neck else set())
    assert trainable == expected
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    image, region = planted()
    train_sam(sam, image[None], [(0, region)], progress=False)
    after = sam.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"prompt_encoder", "mask_decoder"} <= changed
    backbone = [k for k in before if k.startswith("image_encoder.backbone.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)
    neck = [k for k in before if k.startswith("image_encoder.neck.")]
    assert any(not torch.equal(before[k], after[k]) for k in neck) == train_neck


def test_point_encoding_equals_the_random_fourier_formula():
    sam = tiny_sam()
    pe = sam.prompt_encoder
    x, y = 13.0, 41.0
    sparse, dense = pe(torch.tensor([[[x, y]]]), torch.tensor([[1]]), None, 1)
    gauss = pe.pe_layer.positional_encoding_gaussian_matrix.numpy().astype(np.float64)  # (2, C/2)
    u = np.array([(x + 0.5) / SIZE, (y + 0.5) / SIZE])
    angle = 2 * math.pi * ((2 * u - 1) @ gauss)
    expected = np.concatenate([np.sin(angle), np.cos(angle)]) + pe.point_embeddings[1].weight[0].detach().numpy()
    assert sparse.shape == (1, 2, 16)  # the click and the "not a point" pad
    np.testing.assert_allclose(sparse[0, 0].detach().numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(sparse[0, 1].detach().numpy(), pe.not_a_point_embed.weight[0].detach().numpy())
    negative, _ = pe(torch.tensor([[[x, y]]]), torch.tensor([[0]]), None, 1)
    np.testing.assert_allclose((sparse - negative)[0, 0].detach().numpy(),
                               (pe.point_embeddings[1].weight - pe.point_embeddings[0].weight)[0].detach().numpy(),
                               atol=1e-6)  # fmt: skip
    no_mask = pe.no_mask_embed.weight[0].detach()
    assert dense.shape == (1, 16, 4, 4) and torch.equal(dense[0, :, 2, 3], no_mask)


def test_box_is_two_corner_points_with_corner_embeddings():
    sam = tiny_sam()
    pe = sam.prompt_encoder
    box = torch.tensor([[5.0, 7.0, 50.0, 33.0]])
    sparse, _ = pe(None, None, box, 1)
    corners = torch.tensor([[[5.0, 7.0], [50.0, 33.0]]]) + 0.5
    base = pe.pe_layer.forward_with_coords(corners, (SIZE, SIZE))
    assert sparse.shape == (1, 2, 16)
    torch.testing.assert_close(sparse[0, 0], base[0, 0] + pe.point_embeddings[2].weight[0])
    torch.testing.assert_close(sparse[0, 1], base[0, 1] + pe.point_embeddings[3].weight[0])


def test_loss_picks_the_best_mask_and_iou_target():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    perfect = (target * 2 - 1) * 20  # logits that reproduce the target
    logits = torch.cat([torch.full_like(target, -20.0), perfect, torch.full_like(target, 20.0)], dim=1)
    iou_pred = torch.tensor([[0.0, 1.0, 0.25]])  # the actual IoUs: 0, 1, 16/64
    loss, parts = sam_loss(logits, iou_pred, target)
    assert parts["mask"] < 1e-3 and parts["iou_mse"] < 1e-9 and float(loss) < 1e-3


def test_training_on_a_planted_region_lowers_the_loss():
    sam = tiny_sam(steps=150, batch_size=4, lr=1e-2)
    image, region = planted()
    losses = train_sam(sam, image[None], [(0, region)], progress=False)
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10])


def test_clicks_follow_the_errors():
    _, region = planted()
    x, y = centre_click(region)
    assert region[int(y), int(x)] and 20 <= x <= 27 and 26 <= y <= 33  # the middle of the 24×20 box
    point, label = next_click(np.zeros_like(region), region)
    assert label == 1 and region[int(point[1]), int(point[0])]
    pred = region.copy()
    pred[50:60, 50:60] = True  # a false blob larger than the misses
    point, label = next_click(pred, region)
    assert label == 0 and 50 <= point[0] < 60 and 50 <= point[1] < 60


def _official_checkpoint(sam: Sam, depth: int = 12) -> dict[str, torch.Tensor]:
    encoder = {f"image_encoder.blocks.{i}.attn.qkv.weight": torch.randn(3, 1) for i in range(depth)}
    return {**encoder, **to_official_state_dict(sam)}


def test_official_key_layout_round_trips(tmp_path):
    source, target = tiny_sam(seed=1), tiny_sam(seed=2)
    path = tmp_path / "sam_vit_b.pth"
    torch.save({"model": _official_checkpoint(source)}, path)
    parts = load_official_checkpoint(path)
    assert official_variant(parts) == "vit_b"
    assert set(parts["mask_decoder"]) == {k for k in source.mask_decoder.state_dict()}
    assert "pe_layer.positional_encoding_gaussian_matrix" in parts["prompt_encoder"]
    features = torch.randn(1, 16, 4, 4)
    target.image_encoder.load_state_dict(source.image_encoder.state_dict())
    points, labels = torch.tensor([[[9.0, 30.0]]]), torch.tensor([[1]])
    assert not torch.equal(source.decode(features, points, labels)[0], target.decode(features, points, labels)[0])
    load_official_into(target, parts)
    torch.testing.assert_close(source.decode(features, points, labels), target.decode(features, points, labels))
    with pytest.raises(PotpourriError, match="does not fit"):
        load_official_into(tiny_sam(prompt_dim=32), parts)


def test_official_loader_errors(tmp_path, monkeypatch):
    with pytest.raises(PotpourriError, match="download sam_vit_b"):
        load_official_checkpoint(tmp_path / "missing.pth")
    path = tmp_path / "sam_vit_b.pth"
    torch.save(_official_checkpoint(tiny_sam()), path)
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # makes the imports fail
    monkeypatch.setitem(sys.modules, "mobile_sam", None)
    with pytest.raises(PotpourriError, match="pip install segment-anything"):
        build_official_sam(path)
    torch.save({"mask_decoder.x": torch.zeros(1)}, path)
    with pytest.raises(PotpourriError, match="not a segment_anything checkpoint"):
        load_official_checkpoint(path)


def test_annotate_cli_writes_a_class_id_mask(tmp_path, capsys):
    sam = tiny_sam()
    sam.save(tmp_path / "run")
    image, _ = planted()
    Image.fromarray(image).resize((80, 96)).save(tmp_path / "img.png")
    out = tmp_path / "mask" / "img_mask.png"
    rc = main(["annotate", str(tmp_path / "img.png"), "--points", "30,40", "--negative", "5,5",
               "--run", str(tmp_path / "run"), "--class-id", "3", "--out", str(out)])  # fmt: skip
    assert rc == 0
    mask = np.asarray(Image.open(out))
    assert mask.shape == (96, 80) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 3}
    loaded = Sam.load(tmp_path / "run")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in sam.state_dict().items())
    rc = main(["annotate", str(tmp_path / "img.png"), "--points", "300,40", "--model", str(tmp_path / "run"),
               "--out", str(out)])  # fmt: skip
    assert rc == 2 and "outside" in capsys.readouterr().err
    rc = main(["annotate", str(tmp_path / "img.png"), "--box", "1,1,20,20", "--sam-weights", str(tmp_path / "no.pth"),
               "--out", str(out)])  # fmt: skip
    assert rc == 2 and "download" in capsys.readouterr().err


def test_decoder_matches_the_reference_implementation():
    """Official PromptEncoder + MaskDecoder weights load into ours unchanged and give the same masks and IoUs."""
    modeling = pytest.importorskip("mobile_sam.modeling")  # pip install mobilesam-mirror (ships SAM's modeling code)
    sam = tiny_sam(seed=3)
    torch.manual_seed(4)
    prompt = modeling.PromptEncoder(embed_dim=16, image_embedding_size=(4, 4), input_image_size=(SIZE, SIZE),
                                    mask_in_chans=16)  # fmt: skip
    transformer = modeling.TwoWayTransformer(depth=2, embedding_dim=16, num_heads=2, mlp_dim=32)
    decoder = modeling.MaskDecoder(transformer_dim=16, transformer=transformer, iou_head_hidden_dim=16)
    for module in (prompt, decoder):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.3)  # non-trivial LayerNorm and bias values too
    official = {f"prompt_encoder.{k}": v for k, v in prompt.state_dict().items()}
    official |= {f"mask_decoder.{k}": v for k, v in decoder.state_dict().items()}
    assert {k: v.shape for k, v in official.items()} == {k: v.shape for k, v in to_official_state_dict(sam).items()}
    load_official_into(sam, {"prompt_encoder": prompt.state_dict(), "mask_decoder": decoder.state_dict()})
    embeddings = torch.randn(1, 16, 4, 4)  # the reference decodes a batch of prompts for one image
    points, labels = (
        torch.tensor([[[9.0, 30.0], [50.0, 3.0]], [[1.0, 2.0], [60.0, 60.0]]]),
        torch.tensor([[1, 0], [1, 1]]),
    )
    boxes = torch.tensor([[4.0, 5.0, 40.0, 50.0], [10.0, 0.0, 63.0, 20.0]])
    with torch.no_grad():
        for kwargs, multimask in (({"points": (points, labels)}, True), ({"boxes": boxes}, False)):
            ref_sparse, ref_dense = prompt(points=kwargs.get("points"), boxes=kwargs.get("boxes"), masks=None)
            ref = decoder(embeddings, prompt.get_dense_pe(), ref_sparse, ref_dense, multimask_output=multimask)
            ours_pts = kwargs.get("points", (None, None))
            sparse, dense = sam.prompt_encoder(*ours_pts, kwargs.get("boxes"), 2)
            torch.testing.assert_close(sparse, ref_sparse)
            ours = sam.mask_decoder(
                embeddings.expand(2, -1, -1, -1), sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask
            )
            torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(ours[1], ref[1], atol=1e-5, rtol=1e-4)


def test_official_mobile_sam_checkpoint_builds_and_fits_our_decoder(tmp_path):
    """A MobileSAM (vit_t) state dict saved to disk rebuilds the official model; its decoder loads into ours at 256."""
    mobile_sam = pytest.importorskip("mobile_sam")
    torch.manual_seed(0)
    reference = mobile_sam.sam_model_registry["vit_t"](checkpoint=None)
    path = tmp_path / "mobile_sam.pt"
    torch.save(reference.state_dict(), path)
    parts = load_official_checkpoint(path)
    assert official_variant(parts) == "vit_t"
    model = build_official_sam(path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reference.state_dict().items())
    full = SamConfig(backbone="none", image_size=1024, prompt_dim=256, num_heads=8, mlp_dim=2048, iou_hidden=256)
    ours = Sam(full, backbone=None)
    load_official_into(ours, parts)
    assert torch.equal(ours.mask_decoder.iou_token.weight, reference.mask_decoder.iou_token.weight)
