"""Pure diffusion math: schedule, DDIM grid, P2 weights, preprocessing, LR and EMA schedules."""

from __future__ import annotations

import pytest
import torch

from diffinject.diffusion import (
    ddim_timesteps,
    from_model_space,
    linear_alphas_cumprod,
    p2_weights,
    snr,
    to_model_space,
)
from diffinject.stages.diffusion import ema_decay_at, lr_factor


def test_linear_schedule_matches_definition() -> None:
    abar = linear_alphas_cumprod(1000, 1e-4, 0.02)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    assert abar[0].item() == pytest.approx(1 - 1e-4)
    assert torch.allclose(abar[1:] / abar[:-1], 1 - betas[1:])
    assert abar[-1].item() == pytest.approx(4.0358e-05, rel=1e-3)  # DDPM's ᾱ_T for this schedule


@pytest.mark.parametrize(("gamma", "k"), [(1.0, 1.0), (0.5, 1.0), (1.0, 0.1), (2.0, 3.0)])
def test_p2_weights_formula(gamma: float, k: float) -> None:
    abar = linear_alphas_cumprod()
    expected = torch.tensor([1.0 / (k + a / (1 - a)) ** gamma for a in abar.tolist()], dtype=torch.float64)
    assert torch.allclose(p2_weights(abar, gamma, k), expected, rtol=1e-12)


def test_p2_weights_k1_gamma1_is_one_minus_abar_and_gamma0_is_plain() -> None:
    abar = linear_alphas_cumprod()
    assert torch.allclose(p2_weights(abar, 1.0, 1.0), 1 - abar, rtol=1e-10)
    assert torch.allclose(p2_weights(abar, 0.5, 1.0), (1 - abar).sqrt(), rtol=1e-10)
    assert torch.equal(p2_weights(abar, 0.0, 1.0), torch.ones_like(abar))
    w = p2_weights(abar)
    assert w[0] < 1e-3 and w[-1] > 0.9999 and bool((w[1:] >= w[:-1]).all())  # down-weights easy steps
    assert torch.allclose(snr(abar), abar / (1 - abar))


def test_p2_weights_reject_bad_parameters() -> None:
    abar = linear_alphas_cumprod()
    with pytest.raises(ValueError, match="gamma"):
        p2_weights(abar, -1.0)
    with pytest.raises(ValueError, match="k"):
        p2_weights(abar, 1.0, 0.0)


def test_ddim_timesteps_grid() -> None:
    grid = ddim_timesteps(1000, 50)
    assert grid.dtype == torch.long
    assert grid[:3].tolist() == [0, 20, 40] and grid[-1].item() == 980 and len(grid) == 50
    assert ddim_timesteps(1000, 1000).tolist() == list(range(1000))
    with pytest.raises(ValueError, match="must divide"):
        ddim_timesteps(1000, 30)


def test_preprocess_pads_28_to_32_with_black_and_round_trips() -> None:
    images = torch.rand(2, 3, 28, 28)
    x = to_model_space(images, 32)
    assert x.shape == (2, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x[..., :2, :], torch.full_like(x[..., :2, :], -1.0))  # 2 px black border
    assert torch.equal(x[..., 2:30, 2:30], images * 2 - 1)
    assert torch.allclose(from_model_space(x, 28), images, atol=1e-6)
    same = to_model_space(images, 28)
    assert torch.allclose(same, images * 2 - 1) and torch.allclose(
        from_model_space(same, 28), images, atol=1e-6
    )


def test_preprocess_resizes_down_and_rejects_non_square() -> None:
    images = torch.full((1, 3, 64, 64), 0.25)
    x = to_model_space(images, 32)
    assert x.shape == (1, 3, 32, 32) and torch.allclose(x, torch.full_like(x, -0.5), atol=1e-5)
    assert from_model_space(x, 64).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="square"):
        to_model_space(torch.rand(1, 3, 28, 30), 32)


def test_lr_and_ema_schedules() -> None:
    assert lr_factor(0, 10, 100, "constant") == pytest.approx(0.1)
    assert lr_factor(50, 10, 100, "constant") == 1.0
    assert lr_factor(10, 10, 110, "cosine") == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, "cosine") == pytest.approx(0.5)
    assert lr_factor(110, 10, 110, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert ema_decay_at(0, 0.9999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.9999) == pytest.approx(0.91)
    assert ema_decay_at(10**7, 0.9999) == 0.9999
