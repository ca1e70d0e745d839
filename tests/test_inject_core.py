"""The injected DDIM step and the content-h bookkeeping, checked against hand formulas (not the step code).

A stub UNet whose ε is an explicit function of its bottleneck h makes ε(x | h) and ε(x | h̃) differ in a
known way, so the asymmetric step (x̂₀ from ε̃, direction from ε — Asyrp, DESIGN.md "Math") is tested
against the formula itself; swapping ε and ε̃ anywhere in `ddim.py` fails here. The content-h tests check
that inversion records h at the *input* timestep τ_i of each step and that generation step i reads
exactly that entry.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from diffinject.diffusion import (
    Injection,
    ddim_generate,
    ddim_invert,
    ddim_timesteps,
    hspace,
    linear_alphas_cumprod,
)
from inject_helpers import tiny_unet

ABAR = linear_alphas_cumprod()


class StubMid(nn.Module):
    """h = 0.8 x + t/1000: the bottleneck carries both the input and the timestep."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return 0.8 * x + (t.float() / 1000.0).view(-1, 1, 1, 1)


class StubUNet(nn.Module):
    """ε = 0.5 tanh(h) + 0.1 x, h = mid_block(x, t): ε depends on h, so an injected h̃ changes ε."""

    def __init__(self) -> None:
        super().__init__()
        self.mid_block = StubMid()

    @staticmethod
    def eps_from(h: Tensor, x: Tensor) -> Tensor:
        return 0.5 * torch.tanh(h) + 0.1 * x

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.eps_from(self.mid_block(x, t), x)


def hand_slerp(h: Tensor, c: Tensor, gamma: float) -> Tensor:
    """Slerp(h, c·‖h‖/‖c‖, γ) per sample, written out (generic angles only)."""
    out = []
    for a, b in zip(h, c, strict=True):
        b = b * a.norm() / b.norm()
        theta = torch.acos(torch.clamp((a * b).sum() / (a.norm() * b.norm()), -1.0, 1.0))
        out.append((torch.sin((1 - gamma) * theta) * a + torch.sin(gamma * theta) * b) / torch.sin(theta))
    return torch.stack(out)


def hand_step(x: Tensor, eps_x0: Tensor, eps_dir: Tensor, t: int, t_prev: int | None) -> Tensor:
    """η = 0 DDIM step t → t_prev: x̂₀ from eps_x0, direction term from eps_dir."""
    a_t = float(ABAR[t])
    a_prev = 1.0 if t_prev is None else float(ABAR[t_prev])
    x0 = (x - math.sqrt(1 - a_t) * eps_x0) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps_dir


def test_injected_step_uses_eps_tilde_for_x0_and_eps_for_direction() -> None:
    unet, grid, gamma = StubUNet(), ddim_timesteps(1000, 2), 0.6  # τ = 0, 500
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, 4, generator=g)
    h_content = torch.randn(2, 2, 3, 4, 4, generator=g)  # [B, S, ...]: entry i belongs to τ_i
    out = ddim_generate(
        unet, x_T, ABAR, grid, injection=Injection(h_content, gamma, t_edit=500), shared_encoder=False
    )
    # step t = 500 (injected): x̂₀ from ε̃ = ε(x | h̃), direction from ε = ε(x | h)
    t500 = torch.full((2,), 500)
    h = unet.mid_block(x_T, t500)
    eps, eps_tilde = unet.eps_from(h, x_T), unet.eps_from(hand_slerp(h, h_content[:, 1], gamma), x_T)
    assert (eps - eps_tilde).abs().mean() > 1e-2  # the stub really tells the two apart
    x = hand_step(x_T, eps_tilde, eps, 500, 0)
    # step t = 0 (t < t_edit: plain) to the clean image
    eps0 = unet(x, torch.zeros(2, dtype=torch.long))
    expected = hand_step(x, eps0, eps0, 0, None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    swapped = hand_step(hand_step(x_T, eps, eps_tilde, 500, 0), eps0, eps0, 0, None)
    assert (out - swapped).abs().max() > 1e-3  # the check can tell the swap apart


def test_injected_step_shared_encoder_matches_hand_formula() -> None:
    """The encoder-once / decoder-twice path on a real (untrained) UNet, ε̃ from a hook written here."""
    torch.manual_seed(0)
    unet, grid, gamma = tiny_unet(16).eval(), ddim_timesteps(1000, 2), 0.7
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 3, 16, 16, generator=g)
    h_content = torch.randn(2, 2, 32, 8, 8, generator=g)
    with torch.no_grad():
        out = ddim_generate(unet, x_T, ABAR, grid, injection=Injection(h_content, gamma, t_edit=500))
        t500 = torch.full((2,), 500)
        eps = unet(x_T, t500).sample
        handle = unet.mid_block.register_forward_hook(
            lambda module, args, h: hand_slerp(h, h_content[:, 1], gamma)
        )
        try:
            eps_tilde = unet(x_T, t500).sample
        finally:
            handle.remove()
        assert (eps - eps_tilde).abs().mean() > 1e-3
        x = hand_step(x_T, eps_tilde, eps, 500, 0)
        eps0 = unet(x, torch.zeros(2, dtype=torch.long)).sample
        expected = hand_step(x, eps0, eps0, 0, None)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shared_encoder", [True, False])
def test_inversion_records_h_at_each_input_timestep(shared_encoder: bool) -> None:
    """h[:, i] is the bottleneck of the UNet evaluated at (x_{τ_i}, τ_i), x_{τ_i} from a hand inversion."""
    torch.manual_seed(0)
    unet, grid = tiny_unet(16).eval(), ddim_timesteps(1000, 5)
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        inversion = ddim_invert(unet, x0, ABAR, grid, record_h=True, shared_encoder=shared_encoder)
        assert inversion.h is not None and inversion.h.shape[:2] == (2, 5)
        seen: list[Tensor] = []
        handle = unet.mid_block.register_forward_hook(lambda m, a, h: seen.append(h.detach().clone()))
        try:
            x, steps = x0, grid.tolist()
            for i, t in enumerate(steps):
                eps = unet(x, torch.full((2,), t)).sample
                torch.testing.assert_close(inversion.h[:, i], seen[-1], rtol=1e-4, atol=1e-5)
                if i + 1 < len(steps):
                    a_t, a_next = float(ABAR[t]), float(ABAR[steps[i + 1]])
                    x0_pred = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
                    x = math.sqrt(a_next) * x0_pred + math.sqrt(1 - a_next) * eps
        finally:
            handle.remove()
    torch.testing.assert_close(inversion.latent, x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooled", [False, True])
def test_generation_step_i_reads_the_h_recorded_at_tau_i(
    monkeypatch: pytest.MonkeyPatch, pooled: bool
) -> None:
    """A spy blend sees (t, h_content) per injected step: h_content must be entry i of the trajectory."""
    torch.manual_seed(0)
    unet, grid = tiny_unet(16).eval(), ddim_timesteps(1000, 5)  # τ = 0, 200, 400, 600, 800
    trajectory = torch.randn(3, 5, 32, 8, 8, generator=torch.Generator().manual_seed(3))
    slots = torch.tensor([2, 0, 2]) if pooled else None
    used: list[Tensor] = []

    def spy(h: Tensor, h_content: Tensor, gamma: float, mask: Tensor | None = None) -> Tensor:
        used.append(h_content.clone())
        return hspace.slerp_inject(h, h_content, gamma, mask)

    monkeypatch.setitem(hspace.BLENDS, "spy", spy)
    injection = Injection(trajectory, 0.5, t_edit=400, slots=slots, blend="spy")
    x_T = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ddim_generate(unet, x_T, ABAR, grid, injection=injection)
    per_sample = trajectory if slots is None else trajectory[slots]
    assert len(used) == 3  # t = 800, 600, 400, in that order: grid indices 4, 3, 2
    for h_content, i in zip(used, (4, 3, 2), strict=True):
        assert torch.equal(h_content, per_sample[:, i]), i
