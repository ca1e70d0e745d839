"""DDIM inversion and generation (η = 0 inversion, Asyrp's asymmetric injected step), explicit loops.

Grid (DESIGN.md "Math"): `timesteps` is the ascending DDIM grid τ_0 = 0, τ_1, …, τ_{S−1} = T − T/S
(`ddim_timesteps(T, S)`). The image itself plays x_{τ_0}.
- `ddim_invert` takes S − 1 deterministic steps τ_i → τ_{i+1}, ε evaluated at the *input* timestep, fp32,
  no clipping; with `record_h` it returns the bottleneck h at every grid point (the input of each step,
  plus one encoder-only pass at τ_{S−1}), so generation finds the content's h at exactly its own t.
- `ddim_generate` takes S steps τ_{S−1} → … → τ_0 → clean (ᾱ := 1), the exact reverse of the inversion.
  On steps with t ≥ t_edit, x̂₀ uses ε̃ = ε(x_t | h̃) and the direction term the plain ε; η = 1 on steps
  with t ≤ t_boost (σ vanishes on the last step, where ᾱ_prev = 1), `eta` elsewhere.

Arithmetic runs in the dtype of x (keep it fp32); callers may wrap calls in `torch.autocast` so the UNet
runs in bf16 — its outputs are cast back before they touch x.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from diffinject.diffusion.hspace import BLENDS, HSpaceHook
from diffinject.diffusion.unet_split import unet_decode, unet_encode

NoiseFn = Callable[[int], Tensor]


class DDIMInversion(NamedTuple):
    """x at τ_{S−1} and, if recorded, h at every grid point: [B, S, C_h, H_h, W_h] (index i ↔ τ_i), fp32."""

    latent: Tensor
    h: Tensor | None


@dataclass
class Injection:
    """Content injection for `ddim_generate`: the content's h trajectory and the blend settings.

    `h_content[b, i]` is the content h for sample b at grid point τ_i (as `DDIMInversion.h`). With
    `slots`, `h_content` is instead a pool of P trajectories [P, S, …] and sample b uses pool entry
    `slots[b]` (contents shared by many samples are stored once, gathered step by step). Injection applies
    on steps with t ≥ `t_edit`; `mask` selects a region of the h map (local mode, see `slerp_inject`).
    `every` = k injects only on every k-th generation step (counted from the first, noisiest one); the plain
    steps between let the model pull x back onto its data manifold (the reference injects on ~30 of 1,000).
    `t_start` closes an injection *window* t_edit ≤ t ≤ t_start (None: up to T), so the noisiest steps keep
    the generated image's own global layout. `blend` names the h-space operation (`hspace.BLENDS`): "slerp"
    (the paper: the whole map) or "adain" (only the per-channel statistics).
    """

    h_content: Tensor
    gamma: float
    t_edit: int
    mask: Tensor | None = None
    slots: Tensor | None = None
    every: int = 1
    t_start: int | None = None
    blend: str = "slerp"

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"Injection.every must be >= 1, got {self.every}")
        if self.blend not in BLENDS:
            raise ValueError(f"Injection.blend must be one of {sorted(BLENDS)}, got {self.blend!r}")
        if self.t_start is not None and self.t_start < self.t_edit:
            raise ValueError(f"Injection window needs t_edit <= t_start, got {self.t_edit} > {self.t_start}")

    def applies(self, i: int, t: int, num_steps: int) -> bool:
        """Whether generation step i (input timestep t) of an S-step grid injects."""
        in_window = self.t_edit <= t and (self.t_start is None or t <= self.t_start)
        return in_window and (num_steps - 1 - i) % self.every == 0

    def at_step(self, i: int) -> Tensor:
        """The content h of every sample at grid index i, [B, C, H, W]."""
        if self.slots is None:
            return self.h_content[:, i]
        return self.h_content[self.slots.to(self.h_content.device), i]


@dataclass
class Guidance:
    """Classifier guidance on x̂₀ during generation (as diffusion counterfactual explanations, e.g. DiME).

    On steps with t_min ≤ t ≤ t_max, x̂₀ moves by `scale · grad_fn(x̂₀)` (model space) before the step; ε for
    x̂₀ is re-derived from the moved x̂₀, the direction term keeps the model's own ε (the asymmetric step),
    so each step's push enters x at √ᾱ_{t'} and the model keeps the image on its manifold afterwards.
    `grad_fn` returns the (normalised) ascent direction of the guiding objective, e.g. log p(class | x̂₀) of
    a classifier; it is called under `torch.enable_grad()`.
    """

    grad_fn: Callable[[Tensor], Tensor]
    scale: float
    t_min: int = 0
    t_max: int | None = None

    def applies(self, t: int) -> bool:
        return self.scale != 0.0 and self.t_min <= t and (self.t_max is None or t <= self.t_max)


def _check_grid(alphas_cumprod: Tensor, timesteps: Tensor) -> list[int]:
    steps = [int(t) for t in timesteps.tolist()]
    if len(steps) < 1:
        raise ValueError("DDIM grid is empty")
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(
            f"DDIM timesteps must be strictly ascending (ddim_timesteps(T, S)), got {steps[:5]}…"
        )
    if steps[0] < 0 or steps[-1] >= alphas_cumprod.shape[0]:
        raise ValueError(
            f"DDIM timesteps must lie in [0, {alphas_cumprod.shape[0] - 1}], got {steps[0]}…{steps[-1]}"
        )
    return steps


def _eps(output: object, channels: int, dtype: torch.dtype) -> Tensor:
    """ε from a UNet output (diffusers output or tensor); learned-variance channels are ignored by DDIM."""
    eps = output.sample if hasattr(output, "sample") else output
    if not torch.is_tensor(eps):
        raise TypeError(f"UNet returned {type(output).__name__}, expected a tensor or an object with .sample")
    return eps[:, :channels].to(dtype)


def _t_batch(t: int, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)


def _abar(alphas_cumprod: Tensor, t: int | None) -> float:
    """ᾱ_t as a float64 Python number; t = None stands for the clean image (ᾱ = 1)."""
    return 1.0 if t is None else float(alphas_cumprod[t])


def ddim_step(
    x: Tensor,
    eps_x0: Tensor,
    eps_dir: Tensor,
    abar_t: float,
    abar_prev: float,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """One generalised DDIM step t → t' (t' < t).

    x̂₀ = (x_t − √(1−ᾱ_t) ε_x0)/√ᾱ_t; x_{t'} = √ᾱ_{t'} x̂₀ + √(1−ᾱ_{t'}−σ²) ε_dir + σ z,
    σ = η √((1−ᾱ_{t'})/(1−ᾱ_t)) √(1−ᾱ_t/ᾱ_{t'}). ε_x0 ≠ ε_dir is Asyrp's asymmetric step.
    """
    x0 = (x - math.sqrt(1.0 - abar_t) * eps_x0) / math.sqrt(abar_t)
    sigma = (
        eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar_t)) * math.sqrt(max(1.0 - abar_t / abar_prev, 0.0))
    )
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps_dir
    if sigma > 0.0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs noise")
        x_prev = x_prev + sigma * noise
    return x_prev


def _encode_eps(unet: nn.Module, x: Tensor, t: int, channels: int) -> tuple[Tensor, Tensor]:
    encoding = unet_encode(unet, x, _t_batch(t, x))
    return _eps(unet_decode(unet, encoding), channels, x.dtype), encoding.h.float()


@torch.no_grad()
def ddim_invert(
    unet: nn.Module,
    x0: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    record_h: bool = False,
    shared_encoder: bool = True,
) -> DDIMInversion:
    """Deterministic (η = 0) DDIM inversion of images `x0` (model space, [-1, 1]) up to τ_{S−1}.

    With `record_h`, h is read through the UNet split (`shared_encoder=True`, one encoder-only pass at the
    last grid point) or through an `HSpaceHook` on plain forwards (`False`, the reference way).
    """
    steps = _check_grid(alphas_cumprod, timesteps)
    channels = x0.shape[1]
    x = x0.float()
    hs: list[Tensor] = []
    hook = HSpaceHook(unet, mode="record")
    with hook:
        for i, t in enumerate(steps):
            last = i == len(steps) - 1
            if last and not record_h:
                break
            t_b = _t_batch(t, x)
            if record_h and shared_encoder:
                hook.mode = "off"
                if last:
                    hs.append(unet_encode(unet, x, t_b).h.float())
                    break
                eps, h = _encode_eps(unet, x, t, channels)
                hs.append(h)
            else:
                hook.mode = "record" if record_h else "off"
                eps = _eps(unet(x, t_b), channels, x.dtype)
                if record_h:
                    hs.append(hook.recorded.pop().float())
                if last:
                    break
            abar_t, abar_next = _abar(alphas_cumprod, t), _abar(alphas_cumprod, steps[i + 1])
            x0_pred = (x - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)
            x = math.sqrt(abar_next) * x0_pred + math.sqrt(1.0 - abar_next) * eps
    return DDIMInversion(latent=x, h=torch.stack(hs, dim=1) if record_h else None)


def _injected_eps(
    unet: nn.Module,
    x: Tensor,
    t: int,
    h_content: Tensor,
    injection: Injection,
    shared_encoder: bool,
    hook: HSpaceHook,
) -> tuple[Tensor, Tensor]:
    """(ε, ε̃) at x_t: plain and with the blended bottleneck h̃ = slerp_inject(h, h_c, γ, mask)."""
    channels = x.shape[1]

    blend_fn = BLENDS[injection.blend]

    def blend(h: Tensor) -> Tensor:
        return blend_fn(h.float(), h_content, injection.gamma, injection.mask).to(h.dtype)

    if shared_encoder:
        hook.mode = "off"
        encoding = unet_encode(unet, x, _t_batch(t, x))
        h_both = torch.cat([encoding.h, blend(encoding.h)])
        out = _eps(unet_decode(unet, encoding.repeat(2), h_both), channels, x.dtype)
        eps, eps_tilde = out.chunk(2)
        return eps, eps_tilde
    t_b = _t_batch(t, x)
    hook.mode = "off"
    eps = _eps(unet(x, t_b), channels, x.dtype)
    hook.mode, hook.transform = "inject", blend
    eps_tilde = _eps(unet(x, t_b), channels, x.dtype)
    hook.mode = "off"
    return eps, eps_tilde


def _guided_eps(x: Tensor, eps_x0: Tensor, abar_t: float, guidance: Guidance) -> Tensor:
    """ε consistent with x̂₀ + scale · grad(x̂₀): what x̂₀ would be if the model had predicted the push."""
    x0 = (x - math.sqrt(1.0 - abar_t) * eps_x0) / math.sqrt(abar_t)
    # Lightning predicts under inference mode, where autograd is off even inside enable_grad(): leave it for
    # the gradient (grad_fn clones what it differentiates, so no inference tensor is saved for backward).
    with torch.inference_mode(False), torch.enable_grad():
        direction = guidance.grad_fn(x0.detach().clone()).to(x.dtype)
    x0 = x0 + guidance.scale * direction
    return (x - math.sqrt(abar_t) * x0) / math.sqrt(1.0 - abar_t)


@torch.no_grad()
def ddim_generate(
    unet: nn.Module,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    timesteps: Tensor,
    *,
    eta: float = 0.0,
    t_boost: int | None = None,
    noise: NoiseFn | None = None,
    generator: torch.Generator | None = None,
    injection: Injection | None = None,
    guidance: Guidance | None = None,
    shared_encoder: bool = True,
) -> Tensor:
    """DDIM generation from x at τ_{S−1} (`x_T`: an inverted latent or Gaussian noise) to the clean image.

    η on a step with input t is 1 if `t_boost` is set and t ≤ t_boost, else `eta`. Noise for stochastic
    steps comes from `noise(i)` (grid index i; lets callers seed per sample) or else from `generator`.
    With `injection`, steps with t ≥ t_edit use the asymmetric update; `shared_encoder` picks the
    encoder-once / decoder-twice split (fast) or two full UNet passes with an `HSpaceHook` (reference).
    With `guidance`, x̂₀ is pushed along its gradient on the steps it covers (see `Guidance`).
    Returns x̂ in model space, unclipped.
    """
    steps = _check_grid(alphas_cumprod, timesteps)
    if injection is not None:
        rows = x_T.shape[0] if injection.slots is None else injection.h_content.shape[0]
        if injection.h_content.ndim < 3 or injection.h_content.shape[:2] != (rows, len(steps)):
            raise ValueError(
                f"Injection.h_content must be [{'P' if injection.slots is not None else 'B'}={rows}, "
                f"S={len(steps)}, C, H, W], got {tuple(injection.h_content.shape)}"
            )
        if injection.slots is not None and injection.slots.shape != (x_T.shape[0],):
            raise ValueError(
                f"Injection.slots must have shape [B={x_T.shape[0]}], got {tuple(injection.slots.shape)}"
            )
    x = x_T.float()
    channels = x.shape[1]
    hook = HSpaceHook(unet, mode="off")
    with hook:
        for i in range(len(steps) - 1, -1, -1):
            t = steps[i]
            t_prev = steps[i - 1] if i > 0 else None
            step_eta = 1.0 if (t_boost is not None and t <= t_boost) else eta
            if injection is not None and injection.applies(i, t, len(steps)):
                h_c = injection.at_step(i).to(device=x.device, dtype=torch.float32)
                eps, eps_x0 = _injected_eps(unet, x, t, h_c, injection, shared_encoder, hook)
            else:
                hook.mode = "off"
                eps = eps_x0 = _eps(unet(x, _t_batch(t, x)), channels, x.dtype)
            abar_t, abar_prev = _abar(alphas_cumprod, t), _abar(alphas_cumprod, t_prev)
            if guidance is not None and guidance.applies(t):
                eps_x0 = _guided_eps(x, eps_x0, abar_t, guidance)
            z = None
            if step_eta > 0.0 and abar_prev < 1.0:
                z = (
                    noise(i)
                    if noise is not None
                    else torch.randn(
                        x.shape,
                        generator=generator,
                        device=x.device if generator is None else generator.device,
                    )
                )
                z = z.to(device=x.device, dtype=x.dtype)
            x = ddim_step(x, eps_x0, eps, abar_t, abar_prev, step_eta, z)
    return x
