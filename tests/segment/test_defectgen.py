"""Defect-Gen-lite: schedule and forward process against their formulas, the network switch, the sampler, fit/sample."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from potpourri.core.errors import PotpourriError
from potpourri.segment.defectgen import (
    DefectGenConfig,
    DefectGenLite,
    cosine_alpha_bar,
    local_receptive_field,
    preview_grid,
    q_sample,
)

SIZE = 16
CLASSES = 3  # background, bright square, dark square


def tiny_config(**overrides) -> DefectGenConfig:
    base = dict(
        image_size=SIZE,
        num_classes=CLASSES,
        timesteps=100,
        switch_step=40,
        global_width=16,
        global_mults=(1, 2),
        global_patch=2,
        local_width=16,
        local_blocks=2,
        train_steps=30,
        batch_size=4,
        sample_steps=6,
        sample_batch=4,
        progress=False,
    )
    return DefectGenConfig(**{**base, **overrides})


def planted(n: int = 6, *, size: int = SIZE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flat grey images with one bright (class 1) or dark (class 2) square; the mask marks it exactly."""
    rng = np.random.default_rng(seed)
    images = np.full((n, size, size, 3), 120, np.uint8) + rng.integers(0, 10, (n, size, size, 3)).astype(np.uint8)
    masks = np.zeros((n, size, size), np.int64)
    side = size // 4
    for i in range(n):
        y, x = (int(v) for v in rng.integers(0, size - side, 2))
        cls = 1 + i % 2
        images[i, y : y + side, x : x + side] = 240 if cls == 1 else 20
        masks[i, y : y + side, x : x + side] = cls
    return images, masks


@pytest.fixture(scope="module")
def fitted() -> DefectGenLite:
    images, masks = planted()
    return DefectGenLite(tiny_config()).fit(images, masks)


# ----------------------------------------------------------------------------------------------- schedule
def test_cosine_schedule_matches_its_closed_form():
    steps, s = 1000, 0.008
    alpha_bar = cosine_alpha_bar(steps)
    assert alpha_bar.shape == (steps + 1,)
    assert alpha_bar[0].item() == pytest.approx(1.0, abs=1e-12)
    assert alpha_bar[-1].item() < 1e-8
    assert bool((alpha_bar[1:] < alpha_bar[:-1]).all()), "abar must fall strictly with t"
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    for t in (1, 100, 400, 500, 999):
        expected = math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2 / f0
        assert alpha_bar[t].item() == pytest.approx(expected, rel=1e-10, abs=1e-14)
    # the switch level of the reference (t = 400) keeps about 65 % of the signal variance (hand-computed)
    assert alpha_bar[400].item() == pytest.approx(0.6475, abs=1e-3)


def test_forward_noising_has_the_analytic_mean_and_variance():
    alpha_bar = cosine_alpha_bar(1000)
    x0 = torch.tensor([-1.0, -0.3, 0.5, 1.0])
    n = 40_000
    generator = torch.Generator().manual_seed(0)
    for t in (10, 400, 900):
        noise = torch.randn(n, 4, generator=generator, dtype=torch.float64)
        xt = q_sample(x0.double().expand(n, 4), torch.full((n,), t), noise, alpha_bar)  # (n, 4)
        a = alpha_bar[t].item()
        mean_se, var_se = math.sqrt((1 - a) / n), (1 - a) * math.sqrt(2 / n)
        assert torch.allclose(xt.mean(0), math.sqrt(a) * x0.double(), atol=5 * mean_se)
        assert torch.allclose(xt.var(0), torch.full((4,), 1 - a, dtype=torch.float64), atol=5 * var_se)


# ----------------------------------------------------------------------------------------------- the two nets
def _record_timesteps(gen: DefectGenLite) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {"global": [], "local": []}
    for name, net in gen.networks().items():
        net.register_forward_hook(lambda module, args, out, name=name: seen[name].extend(args[1].tolist()))
    return seen


def test_global_net_runs_for_t_at_or_above_the_switch_and_local_below():
    images, masks = planted()
    gen = DefectGenLite(tiny_config(train_steps=12))
    seen = _record_timesteps(gen)
    gen.fit(images, masks)
    assert min(seen["global"]) >= 40 and max(seen["local"]) < 40, "training ranges are split at the switch"
    assert min(seen["local"]) >= 1 and max(seen["global"]) <= 100
    seen["global"].clear(), seen["local"].clear()
    gen.sample(5, seed=0)  # two chunks of sample_batch=4
    # independent expectation: 6 levels evenly spaced from 100 to 0 -> 100, 83, 67, 50, 33, 17 denoise from
    levels = [round(v) for v in np.linspace(100, 0, 7)][:-1]
    expected_global = [t for t in levels if t >= 40]
    expected_local = [t for t in levels if t < 40]
    assert sorted(set(seen["global"]), reverse=True) == expected_global
    assert sorted(set(seen["local"]), reverse=True) == expected_local
    assert len(seen["global"]) == 5 * len(expected_global) and len(seen["local"]) == 5 * len(expected_local)


def test_repo_mode_reproduces_the_reference_staging():
    gen = DefectGenLite(tiny_config(switch_mode="repo"))
    plan = gen.sampling_plan()
    first_local = next(i for i, step in enumerate(plan) if step[0] == "local")
    assert all(net == "global" for net, _, _ in plan[:first_local])
    assert all(net == "local" for net, _, _ in plan[first_local:])
    assert plan[0][1] == 100 - 40 and plan[first_local - 1][2] == 0, "stage 1: a full chain from t = T - s to 0"
    assert plan[first_local][1] == 40 and plan[-1][2] == 0, "stage 2: re-denoise from t = s to 0"
    assert gen.ranges() == {"global": (1, 100), "local": (1, 100)}


def test_sampler_with_an_oracle_denoiser_returns_the_planted_sample():
    gen = DefectGenLite(tiny_config(sample_steps=9, precondition="none"))  # the nets' outputs are x0 themselves
    target = torch.rand(2, 3 + CLASSES, SIZE, SIZE) * 1.8 - 0.9  # inside [-1, 1]: clamping is a no-op

    class Oracle(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return target[: len(x)]

    gen.global_net, gen.local_net = Oracle(), Oracle()
    out = gen.denoise(torch.randn(2, 3 + CLASSES, SIZE, SIZE, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(out, target, atol=1e-5)


def test_preconditioned_denoiser_with_a_zero_net_is_the_gaussian_posterior_mean():
    gen = DefectGenLite(tiny_config(data_std=0.7, precondition="both"))

    class Zero(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(x)

    gen.global_net, gen.local_net = Zero(), Zero()
    x_t = torch.randn(3, 3 + CLASSES, SIZE, SIZE)
    t = torch.tensor([5, 50, 100])
    a = cosine_alpha_bar(100)[t].float().view(-1, 1, 1, 1)
    # x0 ~ N(0, s^2), x_t = sqrt(a) x0 + sqrt(1 - a) eps  =>  E[x0 | x_t] = sqrt(a) s^2 / (a s^2 + 1 - a) x_t
    expected = a.sqrt() * 0.49 / (a * 0.49 + 1 - a) * x_t
    assert torch.allclose(gen.predict_x0("global", x_t, t), expected, atol=1e-6)


def test_receptive_fields_are_small_for_the_local_net_and_whole_image_for_the_global_net():
    size = 32
    gen = DefectGenLite(tiny_config(image_size=size, local_blocks=3))
    x = torch.randn(1, 3 + CLASSES, size, size, requires_grad=True)
    t = torch.tensor([30])
    for name, net in gen.networks().items():
        x.grad = None
        net(x, t)[0, :, size // 2, size // 2].sum().backward()
        support = x.grad.abs().sum(dim=(0, 1)) > 0  # (S, S) pixels that influence the centre output
        rows, cols = support.any(1).nonzero().squeeze(1), support.any(0).nonzero().squeeze(1)
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        if name == "local":
            assert height == width == local_receptive_field(3) == 17
        else:
            assert bool(support.all()), "attention should let every pixel reach the centre output"


# ----------------------------------------------------------------------------------------------- fit and sample
def test_x0_loss_decreases_on_a_planted_data_set():
    images, masks = planted(1)  # one image: the best x0 estimate is that image at every t, so the floor is ~0
    config = tiny_config(train_steps=40, augment=False)
    untrained = DefectGenLite(config)
    data, _ = untrained.prepare(images, masks)
    data = data.expand(8, -1, -1, -1)
    generator = torch.Generator().manual_seed(7)
    noise = torch.randn(data.shape, generator=generator)
    levels = {"global": torch.randint(40, 101, (8,), generator=generator), "local": torch.randint(1, 40, (8,))}
    with torch.no_grad():
        before = {name: untrained.x0_loss(name, data, t, noise).item() for name, t in levels.items()}
    trained = DefectGenLite(config).fit(images, masks)
    with torch.no_grad():
        after = {name: trained.x0_loss(name, data, t, noise).item() for name, t in levels.items()}
    for name in ("global", "local"):
        assert after[name] < 0.7 * before[name], f"{name}: {before[name]:.4f} -> {after[name]:.4f}"
    assert trained.history[0]["loss"] > trained.history[-1]["loss"]


def test_samples_have_the_right_shapes_dtypes_and_class_ids(fitted: DefectGenLite):
    images, masks = fitted.sample(5, seed=3)
    assert images.shape == (5, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert masks.shape == (5, SIZE, SIZE) and masks.dtype == np.int64
    assert masks.min() >= 0 and masks.max() < CLASSES
    empty_images, empty_masks = fitted.sample(0, seed=3)
    assert empty_images.shape == (0, SIZE, SIZE, 3) and empty_masks.shape == (0, SIZE, SIZE)


def test_sampling_is_seeded(fitted: DefectGenLite):
    a_images, a_masks = fitted.sample(5, seed=11)
    b_images, b_masks = fitted.sample(5, seed=11)
    c_images, _ = fitted.sample(5, seed=12)
    assert np.array_equal(a_images, b_images) and np.array_equal(a_masks, b_masks)
    assert not np.array_equal(a_images, c_images)
    prefix_images, prefix_masks = fitted.sample(2, seed=11)  # one noise draw per sample: a prefix is stable
    assert np.array_equal(prefix_images, a_images[:2]) and np.array_equal(prefix_masks, a_masks[:2])


def test_save_load_round_trip_gives_identical_samples(fitted: DefectGenLite, tmp_path):
    fitted.save(tmp_path / "gen")
    loaded = DefectGenLite.load(tmp_path / "gen")
    assert loaded.config == fitted.config
    for key, value in fitted.state_tensors().items():
        assert torch.equal(value, loaded.state_tensors()[key]), key
    for got, want in zip(loaded.sample(3, seed=5), fitted.sample(3, seed=5), strict=True):
        assert np.array_equal(got, want)


def test_load_rejects_missing_or_foreign_folders(fitted: DefectGenLite, tmp_path):
    with pytest.raises(PotpourriError, match="no Defect-Gen-lite model"):
        DefectGenLite.load(tmp_path / "nothing")
    folder = fitted.save(tmp_path / "gen")
    meta = (folder / "defectgen.json").read_text().replace('"format_version": 1', '"format_version": 99')
    (folder / "defectgen.json").write_text(meta)
    with pytest.raises(PotpourriError, match="refit"):
        DefectGenLite.load(folder)


def test_one_hot_encoding_round_trips_through_argmax():
    images, masks = planted()
    gen = DefectGenLite(tiny_config())
    data, _ = gen.prepare(images, masks)
    assert data.shape == (6, 3 + CLASSES, SIZE, SIZE)
    assert set(torch.unique(data[:, 3:]).tolist()) == {-1.0, 1.0}
    assert torch.equal(data[:, 3:].argmax(1), torch.from_numpy(masks))
    rgb = ((data[:, :3] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(rgb, images)


def test_other_sizes_are_resized_with_nearest_masks():
    small_images, small_masks = planted(4)
    block = np.ones((1, 2, 2), np.int64)
    masks = np.kron(small_masks, block)  # (4, 32, 32): every 2x2 block holds one class id
    images = np.kron(small_images, block[..., None]).astype(np.uint8)
    gen = DefectGenLite(tiny_config())
    data, normal_data = gen.prepare(images, masks, normals=images[:2])
    assert data.shape[-2:] == (SIZE, SIZE) and normal_data.shape == (2, 3 + CLASSES, SIZE, SIZE)
    decoded = data[:, 3:].argmax(1).numpy()
    assert np.array_equal(decoded, small_masks), "nearest resize must give back the 16 px masks exactly"
    assert bool((normal_data[:, 3] == 1).all()), "normals get all-background masks"
    assert any("resized" in note for note in gen.notes)


def test_normals_feed_the_local_net_only_when_asked(monkeypatch):
    images, masks = planted(4)
    sizes: dict[str, int] = {}
    original = DefectGenLite._train_net

    def spy(self, net_name, data, *args):
        sizes[net_name] = len(data)
        return original(self, net_name, data, *args)

    monkeypatch.setattr(DefectGenLite, "_train_net", spy)
    gen = DefectGenLite(tiny_config(train_steps=2, use_normals=True)).fit(images, masks, normals=images[:3])
    assert sizes == {"global": 4, "local": 7} and gen.fit_info["n_normals"] == 3
    ignored = DefectGenLite(tiny_config(train_steps=2)).fit(images, masks, normals=images[:3])
    assert sizes == {"global": 4, "local": 4}
    assert any("use_normals=False" in note for note in ignored.notes)


@pytest.mark.parametrize(
    ("images", "masks", "match"),
    [
        (np.zeros((2, SIZE, SIZE, 4), np.uint8), np.zeros((2, SIZE, SIZE), np.int64), "4 channels"),
        (np.zeros((2, SIZE, SIZE), np.uint8), np.zeros((2, SIZE, SIZE), np.int64), r"\(N, H, W, 3\)"),
        (np.zeros((2, SIZE, SIZE, 3), np.float32), np.zeros((2, SIZE, SIZE), np.int64), "uint8"),
        (np.zeros((2, SIZE, SIZE, 3), np.uint8), np.zeros((2, SIZE, SIZE + 1), np.int64), "but the images are"),
        (np.zeros((2, SIZE, SIZE, 3), np.uint8), np.zeros((3, SIZE, SIZE), np.int64), "but the images are"),
        (np.zeros((2, SIZE, SIZE, 3), np.uint8), np.full((2, SIZE, SIZE), CLASSES, np.int64), "unknown class ids"),
        (np.zeros((2, SIZE, SIZE, 3), np.uint8), np.full((2, SIZE, SIZE), -1, np.int64), "unknown class ids"),
        (np.zeros((2, SIZE, SIZE, 3), np.uint8), np.zeros((2, SIZE, SIZE), np.float32), "integer"),
        (np.zeros((0, SIZE, SIZE, 3), np.uint8), np.zeros((0, SIZE, SIZE), np.int64), "no images given"),
    ],
)
def test_bad_inputs_raise_one_clear_error(images, masks, match):
    with pytest.raises(PotpourriError, match=match):
        DefectGenLite(tiny_config()).fit(images, masks)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"switch_step": 100}, "switch_step"),
        ({"switch_step": 1}, "switch_step"),
        ({"switch_mode": "both"}, "switch_mode"),
        ({"image_size": 18}, "divisible"),
        ({"num_classes": 1}, "num_classes"),
        ({"local_crop": 8, "image_size": 32}, "receptive field"),
        ({"sample_steps": 1}, "sample_steps"),
        ({"precondition": True}, "precondition"),
    ],
)
def test_bad_configs_raise(overrides, match):
    with pytest.raises(PotpourriError, match=match):
        DefectGenLite(tiny_config(**overrides))


def test_sampling_before_fit_and_nan_loss_raise():
    with pytest.raises(PotpourriError, match="not trained"):
        DefectGenLite(tiny_config()).sample(2, seed=0)
    gen = DefectGenLite(tiny_config())
    gen.global_net.head.register_forward_hook(lambda module, args, out: out * float("nan"))
    with pytest.raises(PotpourriError, match="loss became nan"):
        gen.fit(*planted())


def test_preview_grid_stacks_images_over_palette_masks():
    images, masks = planted(3)
    grid = preview_grid(images, masks, columns=2)
    assert grid.shape == (2 * 2 * (SIZE + 2), 2 * (SIZE + 2), 3)
    assert np.array_equal(grid[:SIZE, :SIZE], images[0])
    mask_tile = grid[SIZE + 2 : 2 * SIZE + 2, :SIZE]
    assert np.array_equal(mask_tile[masks[0] == 1][0], [0, 0, 255]) and np.array_equal(
        mask_tile[masks[0] == 0][0], [0, 0, 0]
    )


def test_config_round_trips_through_its_dict_and_rejects_unknown_keys():
    config = tiny_config(global_mults=(1, 2))
    assert DefectGenConfig.from_dict(config.to_dict()) == config
    with pytest.raises(PotpourriError, match="unknown Defect-Gen-lite config keys"):
        DefectGenConfig.from_dict({**config.to_dict(), "guidance": 3.0})
    quick = DefectGenConfig.quick(num_classes=3)
    quick.validate()
    assert quick.train_steps < DefectGenConfig().train_steps and quick.num_classes == 3
