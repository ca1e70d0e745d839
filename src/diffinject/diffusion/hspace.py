"""h-space: the output of `unet.mid_block` (the U-Net bottleneck) and the slerp content injection.

`slerp_inject` is the pure blend of DESIGN.md "Math"; `HSpaceHook` reads or rewrites the bottleneck of a
plain `unet(x, t)` call (the simple, reference way); `unet_split` offers the faster encoder/decoder split.
Skip connections are never touched: only h changes, as in Asyrp / InjectFusion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Literal

import torch
from torch import Tensor, nn

HookMode = Literal["record", "inject", "off"]

# Below this angle (radians) sin θ is too small to divide by: slerp and lerp agree to ~θ² there.
_THETA_EPS = 1e-4


def _per_sample_dot(a: Tensor, b: Tensor) -> Tensor:
    """⟨a, b⟩ over C·H·W for every sample, shaped [B, 1, 1, 1] (broadcasts back onto the map)."""
    return (a * b).flatten(1).sum(dim=1).view(-1, *([1] * (a.ndim - 1)))


def slerp_inject(h: Tensor, h_content: Tensor, gamma: float, mask: Tensor | None = None) -> Tensor:
    """h̃ = Slerp(h, h_c · ‖h‖/‖h_c‖, γ): move the style's bottleneck towards the content's.

    Norms and the angle are per sample over C·H·W. γ = 0 returns `h` exactly, γ = 1 returns the rescaled
    content exactly; the result keeps ‖h‖ (slerp between two vectors of equal norm). When the two are
    (anti)parallel, sin θ ≈ 0 and the blend falls back to lerp instead of dividing by zero.

    Local mode: `mask` (values in [0, 1], broadcastable to h, e.g. [h, w] or [B, 1, h, w]) selects the
    region of the h map to change; norms and angle are then taken over the masked values only, so a mask of
    ones is exactly the global blend and the masked region keeps its own norm:
    h̃ = M ⊙ Slerp(M⊙h, M⊙h_c rescaled, γ) + (1 − M) ⊙ h.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"slerp_inject: gamma must be in [0, 1], got {gamma}")
    if h.shape != h_content.shape:
        raise ValueError(
            f"slerp_inject: h {tuple(h.shape)} and h_content {tuple(h_content.shape)} must have one shape"
        )
    if h.ndim < 2:
        raise ValueError(f"slerp_inject: expected a batch of maps [B, ...], got shape {tuple(h.shape)}")
    if gamma == 0.0:
        return h
    h_content = h_content.to(h.dtype)
    if mask is not None:
        mask = mask.to(device=h.device, dtype=h.dtype)
        h_sel, c_sel = h * mask, h_content * mask
    else:
        h_sel, c_sel = h, h_content
    tiny = torch.finfo(h.dtype).tiny
    norm_h = _per_sample_dot(h_sel, h_sel).sqrt()
    norm_c = _per_sample_dot(c_sel, c_sel).sqrt()
    # A (numerically) zero content has no direction to move towards: leave that sample's h unchanged.
    no_content = norm_c <= torch.finfo(h.dtype).eps * norm_h
    scale = torch.where(no_content, torch.zeros_like(norm_c), norm_h / norm_c.clamp_min(tiny))
    c_rescaled = c_sel * scale
    cos = _per_sample_dot(h_sel, c_rescaled) / (norm_h * norm_h).clamp_min(tiny)
    theta = torch.acos(cos.clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    degenerate = sin_theta.abs() < _THETA_EPS
    safe_sin = torch.where(degenerate, torch.ones_like(sin_theta), sin_theta)
    w_h = torch.where(
        degenerate, torch.full_like(theta, 1.0 - gamma), torch.sin((1.0 - gamma) * theta) / safe_sin
    )
    w_c = torch.where(degenerate, torch.full_like(theta, gamma), torch.sin(gamma * theta) / safe_sin)
    w_h = torch.where(no_content, torch.ones_like(w_h), w_h)
    w_c = torch.where(no_content, torch.zeros_like(w_c), w_c)
    # γ = 1 exactly: sin(θ)/sin(θ) need not round to 1 under every kernel
    blended = torch.where(no_content, h_sel, c_rescaled) if gamma == 1.0 else w_h * h_sel + w_c * c_rescaled
    if mask is None:
        return blended
    return mask * blended + (1.0 - mask) * h


def adain_inject(h: Tensor, h_content: Tensor, gamma: float, mask: Tensor | None = None) -> Tensor:
    """Move only h's per-channel statistics towards the content's: AdaIN on the bottleneck, blended by γ.

    h̃ = h + γ · (σ_c · (h − μ_h)/σ_h + μ_c − h), with μ, σ per sample and channel over the h map. The spatial
    pattern of h (where things are) stays the style's; only each channel's mean and spread (what kind of
    thing, in a global sense) follow the content. γ = 0 returns `h`; `mask` limits the change to a region
    (statistics are then taken over the masked cells only).
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"adain_inject: gamma must be in [0, 1], got {gamma}")
    if h.shape != h_content.shape or h.ndim != 4:
        raise ValueError(
            f"adain_inject: h {tuple(h.shape)} and h_content {tuple(h_content.shape)} "
            "must share one B×C×H×W shape"
        )
    if gamma == 0.0:
        return h
    h_content = h_content.to(h.dtype)
    weight = (
        torch.ones_like(h[:, :1])
        if mask is None
        else mask.to(device=h.device, dtype=h.dtype).expand_as(h[:, :1])
    )
    count = weight.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)

    def stats(x: Tensor) -> tuple[Tensor, Tensor]:
        mean = (x * weight).sum(dim=(2, 3), keepdim=True) / count
        var = ((x - mean) ** 2 * weight).sum(dim=(2, 3), keepdim=True) / count
        return mean, var.clamp_min(1e-10).sqrt()

    mean_h, std_h = stats(h)
    mean_c, std_c = stats(h_content)
    moved = (h - mean_h) / std_h * std_c + mean_c
    blended = h + gamma * (moved - h)
    return blended if mask is None else weight * blended + (1.0 - weight) * h


#: h-space blends by name (`Injection.blend`)
BLENDS = {"slerp": slerp_inject, "adain": adain_inject}


def box_mask(height: int, width: int, box: Sequence[float]) -> Tensor:
    """A [height, width] 0/1 mask for a box (top, left, bottom, right) in relative coordinates of the h map.

    Edges are rounded outwards so a small box still covers at least one cell. The reference's 8×8 mask
    (rows 4–6, columns 3–4) is box (0.5, 0.375, 0.875, 0.625).
    """
    if len(box) != 4:
        raise ValueError(f"mask box must be (top, left, bottom, right), got {list(box)}")
    top, left, bottom, right = (float(v) for v in box)
    if not (0.0 <= top < bottom <= 1.0 and 0.0 <= left < right <= 1.0):
        raise ValueError(
            f"mask box (top, left, bottom, right) must satisfy 0 <= top < bottom <= 1 and "
            f"0 <= left < right <= 1, got {list(box)}"
        )
    r0, r1 = int(top * height), -int(-bottom * height)  # floor / ceil without float surprises
    c0, c1 = int(left * width), -int(-right * width)
    mask = torch.zeros(height, width)
    mask[r0:r1, c0:c1] = 1.0
    return mask


class HSpaceHook:
    """Context manager: a forward hook on `unet.mid_block` that records or rewrites h.

    Modes (switchable inside the context through `.mode`): ``"record"`` appends every mid-block output to
    `.recorded`; ``"inject"`` replaces it by `transform(h)`; ``"off"`` passes it through. The hook is
    removed on exit, also when the body raises, so a UNet is never left modified.
    """

    def __init__(
        self,
        unet: nn.Module,
        mode: HookMode = "record",
        transform: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        mid_block = getattr(unet, "mid_block", None)
        if mid_block is None:
            raise ValueError(f"{type(unet).__name__} has no mid_block: h-space needs a U-Net bottleneck")
        self.mid_block: nn.Module = mid_block
        self.mode: HookMode = mode
        self.transform = transform
        self.recorded: list[Tensor] = []
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._check_mode()

    def _check_mode(self) -> None:
        if self.mode not in ("record", "inject", "off"):
            raise ValueError(f"HSpaceHook mode must be 'record', 'inject' or 'off', got {self.mode!r}")

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        self._check_mode()
        if self.mode == "record":
            self.recorded.append(output.detach())
            return None
        if self.mode == "inject":
            if self.transform is None:
                raise RuntimeError("HSpaceHook in 'inject' mode needs a transform")
            return self.transform(output)
        return None

    def __enter__(self) -> HSpaceHook:
        if self._handle is not None:
            raise RuntimeError("HSpaceHook is already active")
        self._handle = self.mid_block.register_forward_hook(self._hook)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
