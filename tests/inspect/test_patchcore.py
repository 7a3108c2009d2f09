"""PatchCore: coreset, chunked nearest neighbours, smoothing, scores on planted defects, determinism, memory."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from potpourri.core.errors import PotpourriError
from potpourri.core.metrics import image_auroc
from potpourri.inspect.patchcore import (
    PatchCore,
    PatchCoreConfig,
    greedy_coreset,
    memory_budget,
    nearest_neighbors,
    partitioned_coreset,
)
from potpourri.models.layers import gaussian_blur


def _planted_points(seed: int = 0) -> torch.Tensor:
    """Five clusters of very different sizes plus a sprinkle of far outliers, 16-d."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, 16, generator=g) * 10
    sizes = [1000, 400, 100, 30, 5]
    clusters = [c + 0.5 * torch.randn(n, 16, generator=g) for c, n in zip(centres, sizes, strict=True)]
    outliers = torch.randn(15, 16, generator=g) * 25
    return torch.cat([*clusters, outliers])


def _covering_radius(points: torch.Tensor, chosen: torch.Tensor) -> float:
    return float(torch.cdist(points, points[chosen]).min(1).values.max())


@pytest.mark.parametrize("projection_dim", [None, 8])
def test_greedy_coreset_covers_better_than_random(projection_dim: int | None) -> None:
    points = _planted_points()
    chosen = greedy_coreset(points, 40, projection_dim=projection_dim, seed=0)
    assert chosen.unique().numel() == 40
    assert torch.equal(points[chosen], points.index_select(0, chosen))  # exact rows of the bank
    greedy = _covering_radius(points, chosen)
    g = torch.Generator().manual_seed(1)
    random_best = min(_covering_radius(points, torch.randperm(len(points), generator=g)[:40]) for _ in range(10))
    assert greedy < random_best


def test_greedy_coreset_equals_naive_farthest_point() -> None:
    points = _planted_points(3)[::7].contiguous()
    chosen = greedy_coreset(points, 12, seed=5).tolist()
    # naive reference: recompute every point's distance to the whole selected set at each step
    naive = [chosen[0]]  # the seeded start
    for _ in range(11):
        naive.append(int(torch.cdist(points, points[naive]).min(1).values.argmax()))
    assert chosen == naive


def test_partitioned_coreset_is_greedy_per_slice_and_covers_each_slice() -> None:
    points = _planted_points(2)
    n = len(points)
    whole = partitioned_coreset(points, 0.1, n, seed=0)  # one slice: exactly the greedy coreset
    assert torch.equal(whole, greedy_coreset(points, math.ceil(0.1 * n), seed=0))
    parts = partitioned_coreset(points, 0.1, math.ceil(n / 3), seed=0)
    bounds = [round(i * n / 3) for i in range(4)]
    assert parts.unique().numel() == parts.numel()
    for part, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        inside = parts[(parts >= lo) & (parts < hi)]
        expected = greedy_coreset(points[lo:hi], math.ceil(0.1 * (hi - lo)), seed=part) + lo
        assert torch.equal(inside, expected)  # each slice is its own greedy k-center
    # composability: every point is covered within the largest per-slice radius
    radii = [
        _covering_radius(points[lo:hi], parts[(parts >= lo) & (parts < hi)] - lo)
        for lo, hi in itertools.pairwise(bounds)
    ]
    assert _covering_radius(points, parts) <= max(radii) + 1e-5


def _allocated_bytes(fn) -> int:
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    return sum(e.self_cpu_memory_usage for e in prof.key_averages() if e.self_cpu_memory_usage > 0)


def test_greedy_coreset_memory_does_not_grow_with_steps() -> None:
    # the loop must reuse preallocated buffers: 350 extra steps may add only per-step scalars (index, argmax),
    # while one (N,) temporary per step would add 350 * 80 kB = 28 MB
    points = torch.randn(20000, 32, generator=torch.Generator().manual_seed(0))
    few = _allocated_bytes(lambda: greedy_coreset(points, 50))
    many = _allocated_bytes(lambda: greedy_coreset(points, 400))
    assert few < 6 * points.shape[0] * 4  # setup: norms, running minimum, step distances
    assert many - few < 350 * 64


def test_chunked_nearest_neighbours_equal_unchunked() -> None:
    g = torch.Generator().manual_seed(0)
    queries, bank = torch.randn(301, 24, generator=g), torch.randn(97, 24, generator=g)
    chunked_d, chunked_i = nearest_neighbors(queries, bank, k=3, chunk_bytes=4 * 97 * 10)  # 10 rows per chunk
    full = torch.cdist(queries, bank)
    expected_d, expected_i = full.topk(3, dim=1, largest=False)
    assert torch.equal(chunked_i, expected_i)
    torch.testing.assert_close(chunked_d, expected_d, rtol=1e-5, atol=1e-5)


def test_faiss_backend_equals_torch() -> None:
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(1)
    queries, bank = torch.randn(200, 16, generator=g), torch.randn(300, 16, generator=g)
    faiss_d, faiss_i = nearest_neighbors(queries, bank, k=2, backend="faiss")
    torch_d, torch_i = nearest_neighbors(queries, bank, k=2)
    assert torch.equal(faiss_i, torch_i)
    torch.testing.assert_close(faiss_d, torch_d, rtol=1e-4, atol=1e-4)
    with pytest.raises(PotpourriError, match="unknown nearest-neighbour backend 'annoy'"):
        nearest_neighbors(queries, bank, backend="annoy")


def test_gaussian_blur_matches_scipy() -> None:
    maps = torch.rand(2, 40, 33, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = np.stack([ndimage.gaussian_filter(m, 2.5, mode="mirror", truncate=4.0) for m in maps.numpy()])
    np.testing.assert_allclose(gaussian_blur(maps, 2.5).numpy(), expected, atol=1e-10)


def test_planted_square_scores_highest_and_map_peaks_inside(fitted: PatchCore, planted) -> None:
    scores, maps = fitted.score(planted.test)
    assert maps.shape == (len(planted.test), *planted.masks.shape[1:])
    assert scores[planted.labels == 1].min() > scores[planted.labels == 0].max()
    for index in np.flatnonzero(planted.labels):
        peak = np.unravel_index(maps[index].argmax(), maps[index].shape)
        assert planted.masks[index][peak] == 1, f"map of image {index} peaks outside the planted square"


def test_plain_image_score_is_max_nearest_patch_distance(fitted: PatchCore, planted, lite0) -> None:
    plain = PatchCore(PatchCoreConfig(**{**vars(fitted.config), "num_neighbors": 1}), backbone=lite0)
    plain.memory_bank = fitted.memory_bank
    scores, _ = plain.score(planted.test[:3])
    features = fitted.embed(planted.test[:3])  # (B, D, h, w)
    patches = features.flatten(2).transpose(1, 2)  # (B, h*w, D)
    expected = torch.cdist(patches, fitted.memory_bank[None]).min(-1).values.max(-1).values
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-5)
    reweighted, _ = fitted.score(planted.test[:3])
    assert np.all((reweighted > 0) & (reweighted < scores))  # eq. 7 weight lies in (0, 1)


def test_fit_is_deterministic_per_seed(planted, small_config, fitted: PatchCore, lite0) -> None:
    again = PatchCore(small_config, backbone=lite0).fit(planted.train)
    assert torch.equal(again.memory_bank, fitted.memory_bank)
    np.testing.assert_array_equal(again.score(planted.test[:2])[0], fitted.score(planted.test[:2])[0])
    other = PatchCore(PatchCoreConfig(**{**vars(small_config), "seed": 1}), backbone=lite0).fit(planted.train)
    assert not torch.equal(other.memory_bank, fitted.memory_bank)


def test_memory_bank_bytes_match_budget_and_1000_images_fit_1_gib(fitted: PatchCore, planted) -> None:
    h, w = fitted.grid()
    budget = memory_budget(fitted.config, len(planted.train), (h, w))
    bank, stored = fitted.memory_bank, fitted.state_tensors()["memory_bank"]
    assert bank.dtype == torch.float32 and stored.dtype == torch.float16  # searched in float32, stored in half
    assert bank.shape[0] == math.ceil(fitted.config.coreset_ratio * len(planted.train) * h * w)
    assert stored.element_size() * stored.nelement() == budget["memory_bank"]
    assert bank.element_size() * bank.nelement() == budget["search_bank"]
    full = PatchCoreConfig()  # defaults: 224 px, 10 % coreset, float16 bank
    big = memory_budget(full, 1000, (28, 28))  # stride-8 grid at 224 px, checked against the model below
    assert big["fit_peak"] <= 1 << 30 and big["memory_bank"] <= 40 * 10**6
    assert big["full_bank"] == 1000 * 28 * 28 * full.embed_dim * 4


def test_float16_bank_scores_match_float32_and_reload_exactly(planted, small_config, fitted, lite0, tmp_path) -> None:
    """Rounding a float32 coreset to half moves scores and maps by < 1e-3 relative and keeps the ranking; both
    storages keep the same rows (selection runs in float32); a saved float16 run reloads bitwise."""
    import copy

    from potpourri.inspect.base import load_method

    exact = PatchCore(PatchCoreConfig(**{**vars(small_config), "bank_dtype": "float32"}), backbone=lite0)
    exact.fit(planted.train)
    assert exact.state_tensors()["memory_bank"].dtype == torch.float32
    rounded = copy.copy(exact)
    rounded.memory_bank = exact.memory_bank.half().float()
    scores32, maps32 = exact.score(planted.test)
    scores16, maps16 = rounded.score(planted.test)
    assert np.abs(scores16 - scores32).max() <= 1e-3 * np.abs(scores32).max()
    assert np.abs(maps16 - maps32).max() <= 1e-3 * np.abs(maps32).max()
    assert image_auroc(planted.labels, scores16) == image_auroc(planted.labels, scores32)
    assert torch.equal(fitted.memory_bank, exact.memory_bank.half().float())  # the same rows, rounded
    reloaded = load_method(fitted.save(tmp_path / "run"))
    assert torch.equal(reloaded.memory_bank, fitted.memory_bank)  # the fitted bank already holds the rounded values
    with pytest.raises(PotpourriError, match="bank_dtype 'int8'"):
        PatchCore(PatchCoreConfig(**{**vars(small_config), "bank_dtype": "int8"}), backbone=lite0).fit(planted.train)


def test_nearest_map_upsampling_repeats_each_patch_score(planted, small_config, lite0) -> None:
    """Unsmoothed, a nearest-upsampled map is constant on each patch's 8 x 8 block and equals its patch distance."""
    config = PatchCoreConfig(**{**vars(small_config), "sigma": 0.0, "map_upsample": "nearest"})
    model = PatchCore(config, backbone=lite0).fit(planted.train)
    _, maps = model.score(planted.test[:1])
    h, w = model.grid()
    blocks = maps[0].reshape(h, 8, w, 8)
    assert np.array_equal(blocks, np.broadcast_to(blocks[:, :1, :, :1], blocks.shape))
    patches = model.embed(planted.test[:1])[0].permute(1, 2, 0).reshape(-1, config.embed_dim)
    nearest = torch.cdist(patches, model.memory_bank).min(1).values.view(h, w)
    assert np.allclose(blocks[:, 0, :, 0], nearest.numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(PotpourriError, match="map_upsample 'cubic'"):
        PatchCore(PatchCoreConfig(map_upsample="cubic"))


def test_grid_at_224_is_28(lite0) -> None:
    probe = PatchCore(PatchCoreConfig(image_size=224), backbone=lite0)
    assert probe.grid() == (28, 28)


def test_few_shot_uses_k_images(planted, small_config, lite0) -> None:
    config = PatchCoreConfig(**{**vars(small_config), "k_shot": 2, "coreset_ratio": 1.0})
    few = PatchCore(config, backbone=lite0).fit(planted.train)
    h, w = few.grid()
    assert few.memory_bank.shape[0] == 2 * h * w and few.n_train_images == 2
    assert image_auroc(planted.labels, few.score(planted.test)[0]) == 1.0  # two normal crops already suffice here
    with pytest.raises(PotpourriError, match="k_shot=20"):
        PatchCore(PatchCoreConfig(k_shot=20)).fit(planted.train)


def test_unfitted_score_is_a_clear_error(planted) -> None:
    with pytest.raises(PotpourriError, match="not fitted"):
        PatchCore(PatchCoreConfig(image_size=96)).score(planted.test[:1])


def test_border_average_counts_the_zero_padding_and_old_runs_keep_theirs(fitted: PatchCore, tmp_path, lite0) -> None:
    """3x3 average of a constant map: corners 4/9, edges 6/9 with zero padding (PatchCore's unfold, anomalib)."""
    from potpourri.inspect.base import load_method
    from potpourri.inspect.patchcore import PatchFeatures

    ones = torch.ones(1, 1, 4, 4)
    padded = PatchFeatures(lite0).aggregate(ones)[0, 0]
    assert padded[0, 0].item() == pytest.approx(4 / 9) and padded[0, 1].item() == pytest.approx(6 / 9)
    assert padded[1, 1].item() == pytest.approx(1.0)
    valid_only = PatchFeatures(lite0, border_zero_pad=False).aggregate(ones)[0, 0]
    assert torch.allclose(valid_only, torch.ones(4, 4))
    folder = fitted.save(tmp_path / "run")
    metadata = json.loads((folder / "metadata.json").read_text())
    del metadata["config"]["border_zero_pad"]  # as written before the option existed
    (folder / "metadata.json").write_text(json.dumps(metadata))
    assert load_method(folder).config.border_zero_pad is False
