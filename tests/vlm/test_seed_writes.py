"""SEED that speaks, second step, on tiny shapes: the text head on the quantised codes (a function of the tokens
alone, whose gradient still reaches the encoder through the straight-through estimator, and which learns a planted
caption task), colour tokens (a planted palette recovered exactly), the decoder's coarse-image skip (an untrained
decoder returns the upsampled coarse image), and the caption-conditioned code sampler (causal; learns a planted
caption → codes map; its codes decode to images of the right shape)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from potpourri.core.errors import PotpourriError
from potpourri.models.pixel_decoder import CodePixelDecoder, PixelDecoderConfig
from potpourri.models.visual_tokenizer import SEEDConfig, SEEDTokenizer
from potpourri.vlm.code_sampler import CodeSampler, CodeSamplerConfig, CodeSamplerTrainConfig, train_code_sampler
from potpourri.vlm.seed_decoder import ColourTokens, decode_tokens
from potpourri.vlm.tokenizer import TokenizerTrainConfig, train_tokenizer

TINY = dict(feature_dim=8, num_queries=3, dim=16, heads=2, layers=1, codebook_size=8, code_dim=4, text_dim=6)


def test_the_code_text_head_reads_only_the_tokens_and_trains_the_encoder() -> None:
    torch.manual_seed(0)
    tok = SEEDTokenizer(SEEDConfig(**TINY, text_from="codes", restart_dead=False)).eval()
    features = torch.randn(4, 8, 2, 2)
    tokens = tok.tokenize(features)
    with torch.no_grad():
        expected = tok.text_head(tok.quantizer.codebook[tokens])[:, 0]  # the head on the tokens' code vectors
        torch.testing.assert_close(tok.text_embedding(features), expected)
        torch.testing.assert_close(tok.text_of_tokens(tokens), expected)
        nudged = features + 1e-4 * torch.randn_like(features)  # same tokens, different continuous outputs
        assert torch.equal(tok.tokenize(nudged), tokens)
        assert not torch.equal(tok.encode(nudged), tok.encode(features))
        torch.testing.assert_close(tok.text_embedding(nudged), expected)
    out = tok(features)  # training's forward: the straight-through codes, equal in value to the tokens' codes
    torch.testing.assert_close(out.text, expected)
    out.text.sum().backward()
    assert tok.to_code.weight.grad.abs().sum() > 0 and tok.qformer.queries.grad.abs().sum() > 0
    with pytest.raises(PotpourriError, match="text_from='codes'"):
        SEEDTokenizer(SEEDConfig(**TINY)).text_of_tokens(tokens)
    with pytest.raises(PotpourriError, match="unknown text source"):
        SEEDTokenizer(SEEDConfig(**TINY, text_from="middle"))


def test_aligning_the_codes_makes_the_tokens_name_a_planted_caption() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(32) % 4  # four kinds of image, one caption each
    features = torch.randn(4, 8, 2, 2, generator=g)[labels] + 0.3 * torch.randn(32, 8, 2, 2, generator=g)
    captions = torch.randn(4, 6, generator=g)
    torch.manual_seed(0)
    tok = SEEDTokenizer(SEEDConfig(**TINY, text_from="codes", restart_dead=False, ema=True))

    def from_tokens() -> float:  # each image's tokens, read in the caption space: nearest caption its own?
        with torch.no_grad():
            sims = F.normalize(tok.text_of_tokens(tok.tokenize(features)), dim=-1) @ F.normalize(captions, dim=-1).T
        return float((sims.argmax(1) == labels).float().mean())

    before = from_tokens()
    train_tokenizer(tok, features, TokenizerTrainConfig(steps=120, batch_size=16, lr=5e-3, progress=False),
                    captions=captions[labels], caption_ids=labels)  # fmt: skip
    assert before < 0.6 and from_tokens() == 1.0


def test_colour_tokens_recover_a_planted_palette() -> None:
    g = torch.Generator().manual_seed(0)
    palette = torch.tensor([[-0.8, 0.1, 0.5], [0.6, -0.4, 0.0], [0.2, 0.9, -0.7]])
    cells = torch.randint(3, (10, 4), generator=g)  # 10 images, 2x2 cells of planted colours
    images = palette[cells].transpose(1, 2).reshape(10, 3, 2, 2).repeat_interleave(4, 2).repeat_interleave(4, 3)
    colours = ColourTokens(grid=2, size=3).fit(images, seed=0)
    tokens = colours.encode(images)  # (10, 4)
    torch.testing.assert_close(colours.decode(tokens), F.adaptive_avg_pool2d(images, 2))  # exact round trip
    mapping = {int(p): int(t) for p, t in zip(cells.flatten(), tokens.flatten(), strict=True)}
    assert len(mapping) == 3 and len(set(mapping.values())) == 3  # one token per planted colour
    with pytest.raises(PotpourriError, match="not fitted"):
        ColourTokens(grid=2, size=3).encode(images)
    with pytest.raises(PotpourriError, match="cannot fit"):
        ColourTokens(grid=2, size=64).fit(images[:1])


def test_an_untrained_skip_decoder_returns_the_upsampled_coarse_image() -> None:
    torch.manual_seed(0)
    cfg = PixelDecoderConfig(code_dim=4, num_codes=3, image_size=16, grid=4, dim=16, heads=2, layers=1, width=16,
                             skip_grid=2)  # fmt: skip
    decoder = CodePixelDecoder(cfg).eval()
    low = torch.rand(2, 3, 2, 2) * 1.6 - 0.8
    with torch.no_grad():
        out = decoder(torch.randn(2, 3, 4), low)
    torch.testing.assert_close(out, F.interpolate(low, size=16, mode="bilinear", align_corners=False))
    with pytest.raises(PotpourriError, match=r"low-frequency image \(B, 3, 2, 2\)"):
        decoder(torch.randn(2, 3, 4))
    with pytest.raises(PotpourriError, match="no low-frequency image"):
        CodePixelDecoder(PixelDecoderConfig(code_dim=4, num_codes=3, image_size=16, grid=4))(torch.randn(2, 3, 4), low)


def test_the_code_sampler_is_causal() -> None:
    torch.manual_seed(0)
    sampler = CodeSampler(CodeSamplerConfig(codebook_size=7, num_codes=5, cond_dim=3, dim=16, heads=2, layers=2)).eval()
    cond, codes = torch.randn(2, 3), torch.randint(7, (2, 5))
    changed = codes.clone()
    changed[:, 2:] = (codes[:, 2:] + 1) % 7
    with torch.no_grad():
        a, b = sampler(cond, codes), sampler(cond, changed)
    assert a.shape == (2, 5, 7)
    torch.testing.assert_close(a[:, :3], b[:, :3])  # position i predicts code i from codes < i: 0..2 see codes 0, 1
    assert not torch.allclose(a[:, 3:], b[:, 3:])
    with pytest.raises(PotpourriError, match="captions"):
        sampler(torch.randn(2, 4), codes)


def test_the_sampler_learns_planted_captions_and_its_codes_decode_to_images() -> None:
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(3, 4, generator=g)  # three captions, each with its own code sequence
    planted = torch.randint(6, (3, 5), generator=g)
    labels = torch.arange(24) % 3
    torch.manual_seed(0)
    sampler = CodeSampler(CodeSamplerConfig(codebook_size=6, num_codes=5, cond_dim=4, dim=32, heads=2, layers=2,
                                            dropout=0.0))  # fmt: skip
    losses = train_code_sampler(sampler, cond[labels], planted[labels],
                                CodeSamplerTrainConfig(steps=120, batch_size=12, lr=3e-3, progress=False))  # fmt: skip
    assert losses[-1] < 0.1 * losses[0]
    greedy = sampler.sample(cond, temperature=0)
    assert torch.equal(greedy, planted)
    assert torch.equal(sampler.sample(cond, top_k=1, generator=torch.Generator().manual_seed(1)), planted)
    drawn = sampler.sample(cond.repeat(4, 1), generator=torch.Generator().manual_seed(2))
    assert drawn.shape == (12, 5) and int(drawn.min()) >= 0 and int(drawn.max()) < 6
    torch.manual_seed(0)  # generated tokens → pixels, through a tokenizer's codebook and a skip decoder
    tok = SEEDTokenizer(SEEDConfig(feature_dim=8, num_queries=5, dim=16, heads=2, layers=1, codebook_size=6,
                                   code_dim=4))  # fmt: skip
    decoder = CodePixelDecoder(PixelDecoderConfig(code_dim=4, num_codes=5, image_size=16, grid=4, dim=16, heads=2,
                                                  layers=1, width=16, skip_grid=2))  # fmt: skip
    colours = ColourTokens(grid=2, size=4).fit(torch.rand(4, 3, 16, 16) * 2 - 1)
    images = decode_tokens(decoder, tok, drawn, colours, torch.randint(4, (12, 4)))
    assert images.shape == (12, 3, 16, 16) and images.abs().max() <= 1
    with pytest.raises(PotpourriError, match="colour tokens and their palette"):
        decode_tokens(decoder, tok, drawn)
