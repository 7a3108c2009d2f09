"""SEED's pixel decoder and text head on tiny shapes: the decoder's contract (shapes, range, clear errors), a
planted decoding task it learns, a time-capped run that a resumed run finishes bitwise like a straight one, and the
text head reading the last causal query only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.core.training import TrainOptions
from potpourri.models.pixel_decoder import CodePixelDecoder, PixelDecoderConfig
from potpourri.models.visual_tokenizer import SEEDConfig, SEEDTokenizer
from potpourri.vlm.seed_decoder import PixelDecoderTrainConfig, decode_tokens, token_codes, train_pixel_decoder

CFG = PixelDecoderConfig(code_dim=4, num_codes=3, image_size=16, grid=4, dim=16, heads=2, layers=1, width=16)


def _planted(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """n code sequences, each mapping to its own flat colour image."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randn(n, 3, 4, generator=g)
    colours = torch.rand(n, 3, 1, 1, generator=g) * 1.6 - 0.8
    return codes, colours.expand(n, 3, 16, 16).contiguous()


def test_decoder_shapes_range_and_errors() -> None:
    torch.manual_seed(0)
    out = CodePixelDecoder(CFG)(torch.randn(2, 3, 4) * 100)
    assert out.shape == (2, 3, 16, 16) and out.abs().max() <= 1.0
    with pytest.raises(PotpourriError, match=r"takes \(B, 3, 4\)"):
        CodePixelDecoder(CFG)(torch.randn(2, 5, 4))
    with pytest.raises(PotpourriError, match="power of two"):
        CodePixelDecoder(PixelDecoderConfig(image_size=24, grid=8))


def test_decoder_learns_a_planted_code_to_image_map() -> None:
    torch.manual_seed(0)
    codes, images = _planted()
    decoder = CodePixelDecoder(CFG)
    with torch.no_grad():
        before = float(((decoder(codes) - images) ** 2).mean())
    losses = train_pixel_decoder(decoder, codes, images, PixelDecoderTrainConfig(steps=150, batch_size=4, lr=5e-3,
                                                                                 progress=False))  # fmt: skip
    with torch.no_grad():
        after = float(((decoder(codes) - images) ** 2).mean())
    assert len(losses) == 150 and after < 0.05 * before  # each code sequence now gives its own colour


def test_a_capped_run_resumed_ends_bitwise_like_a_straight_run(tmp_path) -> None:
    codes, images = _planted()
    cfg = PixelDecoderTrainConfig(steps=6, batch_size=2, progress=False)
    torch.manual_seed(0)
    straight = CodePixelDecoder(CFG)
    train_pixel_decoder(straight, codes, images, cfg, checkpoints=tmp_path / "a")
    torch.manual_seed(0)
    capped = CodePixelDecoder(CFG)
    first = train_pixel_decoder(capped, codes, images, PixelDecoderTrainConfig(**{**cfg.__dict__, "max_seconds": 0.0}),
                                checkpoints=tmp_path / "b")  # fmt: skip
    assert len(first) == 1  # the cap stopped it after one step
    torch.manual_seed(1)  # a different initialisation: the checkpoint must replace it
    resumed = CodePixelDecoder(CFG)
    losses = train_pixel_decoder(resumed, codes, images, cfg, checkpoints=tmp_path / "b",
                                 options=TrainOptions(resume=True, progress=False))  # fmt: skip
    assert len(losses) == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_token_codes_and_decode_tokens_use_the_tokenizers_codebook() -> None:
    torch.manual_seed(0)
    tok = SEEDTokenizer(SEEDConfig(feature_dim=8, num_queries=3, dim=16, heads=2, layers=1, codebook_size=5,
                                   code_dim=4, restart_dead=False))  # fmt: skip
    features = torch.randn(6, 8, 2, 2)
    tokens = tok.tokenize(features)
    codes = token_codes(tok, features, batch=4)
    assert torch.equal(codes, tok.quantizer.codebook[tokens])
    decoder = CodePixelDecoder(CFG).eval()  # eval: attention takes the same (fused) path in both calls
    with torch.no_grad():
        torch.testing.assert_close(decode_tokens(decoder, tok, tokens), decoder(codes))
    with pytest.raises(PotpourriError, match=r"in \[0, 5\)"):
        decode_tokens(decoder, tok, torch.full((1, 3), 5))


def test_the_text_head_reads_the_last_causal_query_only() -> None:
    torch.manual_seed(0)
    tok = SEEDTokenizer(SEEDConfig(feature_dim=8, num_queries=3, dim=16, heads=2, layers=1, codebook_size=5,
                                   code_dim=4, text_dim=6))  # fmt: skip
    features = torch.randn(2, 8, 2, 2)
    out = tok(features)
    hidden = tok.qformer(features.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out.text, tok.text_head(hidden[:, -1]))
    torch.testing.assert_close(tok.text_embedding(features), out.text)
    out.text.sum().backward()
    assert tok.qformer.queries.grad[-1].abs().sum() > 0  # the last query feeds it ...
    assert tok.to_code.weight.grad is None  # ... and the codes do not
    with pytest.raises(PotpourriError, match="no text head"):
        SEEDTokenizer(SEEDConfig(feature_dim=8, num_queries=3, dim=16, heads=2, layers=1)).text_embedding(features)


def test_text_alignment_pulls_each_image_to_its_own_caption() -> None:
    from potpourri.vlm.tokenizer import TokenizerTrainConfig, train_tokenizer

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(32) % 4  # four kinds of image, one caption each
    prototypes = torch.randn(4, 8, 2, 2, generator=g)
    features = prototypes[labels] + 0.3 * torch.randn(32, 8, 2, 2, generator=g)
    captions = torch.randn(4, 6, generator=g)[labels]  # (32, 6): the caption embedding of each image's kind
    torch.manual_seed(0)
    tok = SEEDTokenizer(SEEDConfig(feature_dim=8, num_queries=3, dim=16, heads=2, layers=1, codebook_size=8,
                                   code_dim=4, text_dim=6, restart_dead=False))  # fmt: skip

    def retrieval() -> float:  # each image's text embedding against the four captions: the right one first?
        with torch.no_grad():
            sims = F.normalize(tok.text_embedding(features), dim=-1) @ F.normalize(captions[:4], dim=-1).T
        return float((sims.argmax(1) == labels).float().mean())

    before = retrieval()
    history = train_tokenizer(tok, features, TokenizerTrainConfig(steps=60, batch_size=16, lr=5e-3, progress=False),
                              captions=captions, caption_ids=labels)  # fmt: skip
    assert len(history.text_loss) == 60 and history.text_loss[-1] < history.text_loss[0]
    assert before < 0.6 and retrieval() == 1.0
    with pytest.raises(PotpourriError, match="text_dim = 5"):
        train_tokenizer(tok, features, TokenizerTrainConfig(steps=1, progress=False), captions=torch.zeros(32, 5))
