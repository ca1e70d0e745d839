"""DDIM inversion / generation: round trips on a trained tiny UNet, the asymmetric step, injection paths."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DModel

from diffinject.diffusion import (
    Injection,
    ddim_generate,
    ddim_invert,
    ddim_step,
    ddim_timesteps,
    linear_alphas_cumprod,
)
from inject_helpers import blob_images, train_tiny_unet

ABAR = linear_alphas_cumprod()


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Tiny UNet kernels: one intra-op thread is several times faster than two on a loaded 2-core box.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return blob_images(8, size=16)


@pytest.fixture(scope="module")
def trained_unet(images: torch.Tensor) -> UNet2DModel:
    return train_tiny_unet(images, steps=300)


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def test_round_trip_reconstructs(trained_unet: UNet2DModel, images: torch.Tensor) -> None:
    """Bound: MSE in [-1, 1] space < 5e-3 at S = 50 and < 1.5e-3 at S = 100 (measured ≈ 1e-3 / 3e-4)."""
    errors = {}
    for steps in (20, 50, 100):
        grid = ddim_timesteps(1000, steps)
        inv = ddim_invert(trained_unet, images, ABAR, grid)
        assert inv.h is None
        errors[steps] = _mse(ddim_generate(trained_unet, inv.latent, ABAR, grid), images)
    assert errors[50] < 5e-3, errors
    assert errors[100] < 1.5e-3, errors
    assert errors[100] < errors[50] < errors[20], errors
    # the latent really is noise-like, not the image: inversion went somewhere
    assert _mse(inv.latent, images) > 0.5


def test_recorded_h_split_equals_hook(trained_unet: UNet2DModel, images: torch.Tensor) -> None:
    grid = ddim_timesteps(1000, 10)
    fast = ddim_invert(trained_unet, images[:3], ABAR, grid, record_h=True)
    reference = ddim_invert(trained_unet, images[:3], ABAR, grid, record_h=True, shared_encoder=False)
    plain = ddim_invert(trained_unet, images[:3], ABAR, grid)
    assert fast.h is not None and reference.h is not None
    assert fast.h.shape == (3, 10, 32, 8, 8) and fast.h.dtype == torch.float32
    torch.testing.assert_close(fast.h, reference.h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.latent, plain.latent, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast.h[:, 0], fast.h[:, -1])  # one h per grid point, not a copy


def _content_h(unet: UNet2DModel, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    h = ddim_invert(unet, images, ABAR, grid, record_h=True).h
    assert h is not None
    return h


def test_gamma_zero_injection_is_plain_regeneration(trained_unet: UNet2DModel, images: torch.Tensor) -> None:
    grid = ddim_timesteps(1000, 20)
    style, content = images[:3], images[3:6]
    latent = ddim_invert(trained_unet, style, ABAR, grid).latent
    plain = ddim_generate(trained_unet, latent, ABAR, grid)
    injection = Injection(_content_h(trained_unet, content, grid), gamma=0.0, t_edit=400)
    for shared in (True, False):
        out = ddim_generate(trained_unet, latent, ABAR, grid, injection=injection, shared_encoder=shared)
        torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_shared_encoder_equals_two_full_passes(trained_unet: UNet2DModel, images: torch.Tensor) -> None:
    grid = ddim_timesteps(1000, 20)
    style, content = images[:4], images[4:8]
    latent = ddim_invert(trained_unet, style, ABAR, grid).latent
    plain = ddim_generate(trained_unet, latent, ABAR, grid)
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1
    for m in (None, mask):
        injection = Injection(_content_h(trained_unet, content, grid), gamma=0.7, t_edit=400, mask=m)
        fast = ddim_generate(trained_unet, latent, ABAR, grid, injection=injection)
        naive = ddim_generate(trained_unet, latent, ABAR, grid, injection=injection, shared_encoder=False)
        torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-4)
        assert _mse(fast, plain) > 1e-4  # the injection does something
    # t_edit above every grid point: no step is injected
    never = Injection(_content_h(trained_unet, content, grid), gamma=1.0, t_edit=1000)
    torch.testing.assert_close(ddim_generate(trained_unet, latent, ABAR, grid, injection=never), plain)


def test_pooled_content_slots_equal_per_sample_h(trained_unet: UNet2DModel, images: torch.Tensor) -> None:
    grid = ddim_timesteps(1000, 10)
    latent = ddim_invert(trained_unet, images[:4], ABAR, grid).latent
    pool = _content_h(trained_unet, images[4:6], grid)  # two contents shared by four samples
    slots = torch.tensor([1, 0, 1, 1])
    pooled = Injection(pool, gamma=0.6, t_edit=300, slots=slots)
    per_sample = Injection(pool[slots], gamma=0.6, t_edit=300)
    torch.testing.assert_close(
        ddim_generate(trained_unet, latent, ABAR, grid, injection=pooled),
        ddim_generate(trained_unet, latent, ABAR, grid, injection=per_sample),
    )
    with pytest.raises(ValueError, match="slots must have shape"):
        ddim_generate(trained_unet, latent, ABAR, grid, injection=Injection(pool, 0.6, 300, slots=slots[:2]))


def test_boost_noise_only_on_late_steps(trained_unet: UNet2DModel, images: torch.Tensor) -> None:
    grid = ddim_timesteps(1000, 10)
    latent = ddim_invert(trained_unet, images[:2], ABAR, grid).latent
    calls: list[int] = []

    def noise(i: int) -> torch.Tensor:
        calls.append(i)
        return torch.ones_like(latent)

    boosted = ddim_generate(trained_unet, latent, ABAR, grid, t_boost=200, noise=noise)
    # grid 0, 100, …, 900: η = 1 on t = 200, 100; the last step (t = 0 → clean) has σ = 0
    assert calls == [2, 1]
    plain = ddim_generate(trained_unet, latent, ABAR, grid)
    assert _mse(boosted, plain) > 1e-4
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = ddim_generate(trained_unet, latent, ABAR, grid, t_boost=200, generator=g1)
    b = ddim_generate(trained_unet, latent, ABAR, grid, t_boost=200, generator=g2)
    torch.testing.assert_close(a, b)


def test_ddim_step_formula() -> None:
    a_t, a_prev = float(ABAR[400]), float(ABAR[380])
    x, e0, e1, z = (torch.full((1, 1, 1, 1), v) for v in (0.3, -0.5, 0.8, 1.2))
    x0 = (0.3 - math.sqrt(1 - a_t) * -0.5) / math.sqrt(a_t)
    expected = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * 0.8  # asymmetric: x̂₀ from e0, direction e1
    assert ddim_step(x, e0, e1, a_t, a_prev).item() == pytest.approx(expected, rel=1e-6)
    # η = 1 gives the DDPM posterior std
    sigma = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    expected_noisy = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * 0.8 + sigma * 1.2
    assert ddim_step(x, e0, e1, a_t, a_prev, eta=1.0, noise=z).item() == pytest.approx(
        expected_noisy, rel=1e-6
    )
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(x, e0, e1, a_t, a_prev, eta=1.0)


def test_grid_and_shape_validation(trained_unet: UNet2DModel, images: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="ascending"):
        ddim_invert(trained_unet, images[:1], ABAR, torch.tensor([500, 0]))
    grid = ddim_timesteps(1000, 10)
    bad = Injection(torch.zeros(1, 5, 32, 8, 8), gamma=0.5, t_edit=400)
    with pytest.raises(ValueError, match="h_content must be"):
        ddim_generate(trained_unet, images[:1], ABAR, grid, injection=bad)


def test_sparse_injection_applies_on_every_kth_step_from_the_noisiest() -> None:
    h = torch.zeros(1, 10, 1, 1, 1)
    sparse = Injection(h, gamma=0.5, t_edit=400, every=3)
    grid = [int(t) for t in ddim_timesteps(1000, 10)]  # 0, 100, …, 900; generation runs i = 9 … 0
    injected = [t for i, t in enumerate(grid) if sparse.applies(i, t, len(grid))]
    assert injected == [600, 900]  # i = 9 and 6 (t >= 400); i = 3 has t = 300 < t_edit
    dense = Injection(h, gamma=0.5, t_edit=400)
    assert [t for i, t in enumerate(grid) if dense.applies(i, t, len(grid))] == [400, 500, 600, 700, 800, 900]
    with pytest.raises(ValueError, match="every must be >= 1"):
        Injection(h, gamma=0.5, t_edit=400, every=0)


def test_sparse_injection_changes_less_than_dense(trained_unet: UNet2DModel, images: torch.Tensor) -> None:
    grid = ddim_timesteps(1000, 20)
    latent = ddim_invert(trained_unet, images[:3], ABAR, grid).latent
    plain = ddim_generate(trained_unet, latent, ABAR, grid)
    h = _content_h(trained_unet, images[3:6], grid)
    dense = ddim_generate(trained_unet, latent, ABAR, grid, injection=Injection(h, 0.7, 400))
    sparse = ddim_generate(trained_unet, latent, ABAR, grid, injection=Injection(h, 0.7, 400, every=4))
    assert 1e-6 < _mse(sparse, plain) < _mse(dense, plain)
