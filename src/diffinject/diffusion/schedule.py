"""DDPM noise schedule, DDIM time grid and P2 loss weights: pure functions, no module state.

All schedule tensors are **float64** on the CPU: the cumulative product over 1,000 steps and SNR near
t = T lose digits in float32. Callers index them with the timesteps they need and cast the result with
`.to(device=x.device, dtype=torch.float32)` before mixing with activations.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_betas(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """β_t linearly spaced from `beta_start` to `beta_end` (Ho et al. 2020), float64, shape [T]."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"expected 0 < beta_start <= beta_end < 1, got {beta_start=}, {beta_end=}")
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)


def linear_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """ᾱ_t = Π_{s≤t} (1 − β_s) for the linear schedule; float64, shape [T], index t = 0 … T−1."""
    return torch.cumprod(1.0 - linear_betas(num_train_timesteps, beta_start, beta_end), dim=0)


def ddim_timesteps(num_train_timesteps: int, num_steps: int) -> Tensor:
    """The DDIM grid τ = 0, T/S, …, T − T/S (ascending, int64), as in the design contract.

    Only exact divisors are accepted: a rounded grid would silently change the step sizes that inversion
    and generation must share.
    """
    if num_steps < 1 or num_train_timesteps < 1:
        raise ValueError(f"expected positive step counts, got T={num_train_timesteps}, S={num_steps}")
    if num_train_timesteps % num_steps != 0:
        raise ValueError(
            f"num_steps={num_steps} must divide num_train_timesteps={num_train_timesteps} "
            f"(e.g. 10, 20, 25, 50, 100 for T=1000)"
        )
    stride = num_train_timesteps // num_steps
    return torch.arange(0, num_train_timesteps, stride, dtype=torch.long)


def snr(alphas_cumprod: Tensor) -> Tensor:
    """Signal-to-noise ratio ᾱ / (1 − ᾱ), same dtype and shape as the input."""
    return alphas_cumprod / (1.0 - alphas_cumprod)


def p2_weights(alphas_cumprod: Tensor, gamma: float = 1.0, k: float = 1.0) -> Tensor:
    """P2 weights λ_t = 1 / (k + SNR(t))^γ (Choi et al. 2022), unnormalised as the reference code.

    γ = 0 gives all ones (the plain ε-MSE); with k = 1 the weight equals (1 − ᾱ_t)^γ.
    """
    if gamma < 0:
        raise ValueError(f"p2 gamma must be >= 0, got {gamma}")
    if k <= 0 and gamma > 0:
        raise ValueError(f"p2 k must be > 0 when gamma > 0 (the weight would blow up at high noise), got {k}")
    return 1.0 / (k + snr(alphas_cumprod)) ** gamma
