"""WinCLIP-style baseline: prompt ensemble, harmonic window aggregation, CLIP windows, a planted anomaly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from potpourri.core.metrics import pixel_auroc
from potpourri.inspect.towers import Towers
from potpourri.inspect.winclip import (
    ANOMALOUS_STATES,
    NORMAL_STATES,
    TEMPLATES,
    WinCLIP,
    WinCLIPConfig,
    harmonic_window_map,
    prompt_ensemble,
)


def test_prompt_ensemble_is_states_times_templates() -> None:
    normal, anomalous = prompt_ensemble("brick surface")
    assert len(normal) == len(NORMAL_STATES) * len(TEMPLATES)
    assert len(anomalous) == len(ANOMALOUS_STATES) * len(TEMPLATES)
    assert all("brick surface" in s for s in normal + anomalous)
    assert not set(normal) & set(anomalous)


def test_harmonic_window_map_matches_a_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 4, 5, generator=g) + 0.05  # windows of side 3 on a 6×7 grid
    fast = harmonic_window_map(scores, 3)
    naive = torch.zeros(2, 6, 7)
    for i in range(6):
        for j in range(7):
            covering = scores[:, max(0, i - 2) : i + 1, max(0, j - 2) : j + 1].reshape(2, -1)
            naive[:, i, j] = covering.shape[1] / (1 / covering).sum(1)
    assert torch.allclose(fast, naive, atol=1e-6)


def test_clip_window_over_the_whole_grid_is_the_global_embedding() -> None:
    open_clip = pytest.importorskip("open_clip")
    from potpourri.inspect.anomalyclip import ClipTowers, build_clip_from_config
    from tests.inspect.test_anomalyclip import TINY

    torch.manual_seed(0)
    towers = ClipTowers(build_clip_from_config(TINY), tokenizer=open_clip.SimpleTokenizer(context_length=24))
    x = torch.randn(2, 3, 32, 32)
    whole = towers.window_embeddings(x, 4)  # the 4×4 grid: one window with every patch
    with torch.no_grad():
        assert torch.equal(whole[:, 0, 0], towers.clip.encode_image(x))
        one = towers.window_embeddings(x, 1)  # (B, 4, 4, D): class token + a single patch
        tokens = towers.clip.visual._embeds(x)[:, [0, 1 + 5]]  # patch (1, 1) of the 4×4 grid
        pooled, _ = towers.clip.visual._pool(towers.clip.visual.transformer(tokens))
    assert torch.allclose(one[:, 1, 1], pooled @ towers.clip.visual.proj, atol=1e-6)


class BrightnessTowers(Towers):
    """Toy towers with a known answer: a window's embedding is (1 - mean brightness, mean brightness)."""

    image_size, mean, std = 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def __init__(self) -> None:
        super().__init__()
        self.prompts = torch.nn.Module()

    def _embed(self, brightness: torch.Tensor) -> torch.Tensor:
        return torch.stack([1 - brightness, brightness], -1)

    def frozen_image_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"global": images.mean((1, 2, 3))}

    def project_image(self, features):
        return self._embed(features["global"]), []

    def encode_texts(self, texts):
        words = ("damaged", "broken", "with flaw", "with defect", "with damage")
        return torch.stack([torch.tensor([0.0, 1.0] if any(w in t for w in words) else [1.0, 0.0]) for t in texts])

    def window_embeddings(self, images: torch.Tensor, scale: int) -> torch.Tensor:
        cells = F.avg_pool2d(images.mean(1, keepdim=True), 4)  # (B, 1, 8, 8) "patches" of 4×4 pixels
        return self._embed(F.avg_pool2d(cells, scale, stride=1)[:, 0])


def test_winclip_scores_a_planted_anomaly_higher_and_localises_it() -> None:
    rng = np.random.default_rng(0)
    normal = [(rng.random((32, 32, 3)) * 60).astype(np.uint8) for _ in range(3)]
    defects, masks = [], []
    for _ in range(3):
        image, mask = (rng.random((32, 32, 3)) * 60).astype(np.uint8), np.zeros((32, 32), np.uint8)
        y, x = rng.integers(2, 22, 2)
        image[y : y + 8, x : x + 8] = 250
        mask[y : y + 8, x : x + 8] = 1
        defects.append(image)
        masks.append(mask)
    model = WinCLIP(WinCLIPConfig(scales=(1, 2, 3), sigma=1.0, batch_size=4), towers=BrightnessTowers()).fit([])
    scores, maps = model.score(normal + defects)
    assert scores[3:].min() > scores[:3].max()
    assert pixel_auroc(np.stack(masks), maps[3:]) > 0.95
    assert maps.shape == (6, 32, 32)


def test_winclip_state_round_trip_keeps_the_text() -> None:
    model = WinCLIP(WinCLIPConfig(), towers=BrightnessTowers())
    state = model.state_tensors()
    assert set(state) == {"text"} and state["text"].shape == (2, 2)
    other = WinCLIP(WinCLIPConfig(), towers=BrightnessTowers())
    other.load_state_tensors({"text": state["text"] * 0 + torch.tensor([[1.0, 0.0], [0.0, 1.0]])})
    assert torch.equal(other.text_features(), torch.eye(2))
