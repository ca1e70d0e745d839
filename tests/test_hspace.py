"""slerp_inject properties and the h-space hook's lifecycle."""

from __future__ import annotations

import pytest
import torch

from diffinject.diffusion import HSpaceHook, box_mask, slerp_inject
from inject_helpers import tiny_unet


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1)


@pytest.fixture
def pair() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 8, 3, 3, generator=g)
    h_c = torch.randn(4, 8, 3, 3, generator=g) * 5.0  # different norm on purpose
    return h, h_c


def test_gamma_zero_is_style(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    h, h_c = pair
    assert torch.equal(slerp_inject(h, h_c, 0.0), h)


def test_gamma_one_is_rescaled_content(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    h, h_c = pair
    out = slerp_inject(h, h_c, 1.0)
    expected = h_c * (_norms(h) / _norms(h_c)).view(-1, 1, 1, 1)
    torch.testing.assert_close(out, expected)
    # direction of the content, norm of the style
    torch.testing.assert_close(_norms(out), _norms(h))


@pytest.mark.parametrize("gamma", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_norm_kept_and_angle_split(pair: tuple[torch.Tensor, torch.Tensor], gamma: float) -> None:
    h, h_c = pair
    out = slerp_inject(h, h_c, gamma)
    torch.testing.assert_close(_norms(out), _norms(h), rtol=1e-5, atol=1e-5)

    def angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.acos((a.flatten(1) * b.flatten(1)).sum(1) / (_norms(a) * _norms(b)))

    # slerp walks the great circle: the angle to h is γθ, to the content (1−γ)θ
    theta = angle(h, h_c)
    torch.testing.assert_close(angle(h, out), gamma * theta, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(angle(out, h_c), (1 - gamma) * theta, rtol=1e-4, atol=1e-4)


def test_parallel_and_antiparallel_give_no_nan() -> None:
    h = torch.randn(3, 4, 2, 2)
    scale = torch.tensor([2.0, 1.0, -3.0]).view(-1, 1, 1, 1)
    h_c = h * scale  # parallel, identical, antiparallel
    h_c[1] = h[1] + 1e-7  # nearly identical
    out = slerp_inject(h, h_c, 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:2], h[:2], rtol=1e-5, atol=1e-5)  # same direction and norm as h
    # a zero content has no direction: h stays as it is (finite, not a shrunken h)
    for gamma in (0.5, 1.0):
        assert torch.equal(slerp_inject(h, torch.zeros_like(h), gamma), h)


def test_mask_limits_the_change(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    h, h_c = pair
    mask = box_mask(3, 3, (0.0, 0.0, 0.34, 1.0))  # first row
    assert mask.sum() == 3 and mask[0].sum() == 3
    out = slerp_inject(h, h_c, 0.7, mask=mask)
    assert torch.equal(out[..., 1:, :], h[..., 1:, :])
    assert not torch.allclose(out[..., 0, :], h[..., 0, :])
    region = out[..., :1, :]
    torch.testing.assert_close(_norms(region), _norms(h[..., :1, :]), rtol=1e-5, atol=1e-5)
    # a mask of ones is the global blend
    torch.testing.assert_close(slerp_inject(h, h_c, 0.7, torch.ones(3, 3)), slerp_inject(h, h_c, 0.7))


def test_box_mask_matches_reference_patch_and_validates() -> None:
    mask = box_mask(8, 8, (0.5, 0.375, 0.875, 0.625))
    expected = torch.zeros(8, 8)
    expected[4:7, 3:5] = 1
    assert torch.equal(mask, expected)
    with pytest.raises(ValueError, match="top < bottom"):
        box_mask(8, 8, (0.5, 0.1, 0.4, 0.2))


def test_slerp_validates_inputs(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    h, h_c = pair
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        slerp_inject(h, h_c, 1.5)
    with pytest.raises(ValueError, match="same shape|one shape"):
        slerp_inject(h, h_c[:2], 0.5)


def test_hook_records_injects_and_is_removed() -> None:
    unet = tiny_unet(size=8).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 10])
    with torch.no_grad():
        plain = unet(x, t).sample
        with HSpaceHook(unet, mode="record") as hook:
            assert len(unet.mid_block._forward_hooks) == 1
            unet(x, t)
            assert hook.recorded[0].shape == (2, 32, 4, 4)
            hook.mode, hook.transform = "inject", torch.zeros_like
            zeroed = unet(x, t).sample
            hook.mode = "off"
            torch.testing.assert_close(unet(x, t).sample, plain)
        assert not torch.allclose(zeroed, plain)
        assert len(unet.mid_block._forward_hooks) == 0
        torch.testing.assert_close(unet(x, t).sample, plain)


def test_hook_removed_after_exception() -> None:
    unet = tiny_unet(size=8)
    with pytest.raises(RuntimeError, match="boom"), HSpaceHook(unet, mode="record"):
        raise RuntimeError("boom")
    assert len(unet.mid_block._forward_hooks) == 0
    with pytest.raises(ValueError, match="mode must be"):
        HSpaceHook(unet, mode="bogus")  # type: ignore[arg-type]
