"""Settings of the injection stage, refused at construction when they are out of range or meaningless.

"Meaningless" means accepted but without effect: a γ > 0 whose injection window holds no generation step
(t_edit above the last DDIM grid step, a t_edit..t_start window between two grid points, a sparse
`inject_every` that skips the window), or guidance whose t_min..t_max window holds no step. Each error
names the value, the grid and what would work.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffinject.diffusion import Injection
from diffinject.diffusion.hspace import BLENDS

#: where generation starts: the style's inverted x_T (the paper), the content's, or the content's
#: re-normalised to the style's per-channel statistics (StyleID's initial-latent AdaIN)
START_FROM = ("style", "content", "content_stats")
#: whose h trajectory is blended into the generation (γ > 0): the content's (the paper) or the style's
INJECT_FROM = ("content", "style")


def diffusion_stage_hint(unet_dir: Path) -> str:
    """The command that writes a UNet export; dataset guessed from runs/{dataset}/{pct}/diffusion/unet."""
    parts = unet_dir.parts
    dataset = parts[-4] if len(parts) >= 4 and parts[-2] == "diffusion" else "<dataset>"
    return f"diffinject fit --config configs/{dataset}/diffusion.yaml"


def validate_modes(
    blend: str,
    t_start: int | None,
    t_edit: int,
    start_from: str,
    inject_from: str,
    bias_model: str | None,
    guidance_scale: float,
    guidance_smooth: int = 0,
) -> None:
    """The injection-mode options (see `InjectionPredictModule`), each refused with the allowed values."""
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {sorted(BLENDS)}, got {blend!r}")
    if t_start is not None and t_start < t_edit:
        raise ValueError(
            f"t_start ({t_start}) must be >= t_edit ({t_edit}): the window is t_edit <= t <= t_start"
        )
    if start_from not in START_FROM:
        raise ValueError(f"start_from must be one of {list(START_FROM)}, got {start_from!r}")
    if inject_from not in INJECT_FROM:
        raise ValueError(f"inject_from must be one of {list(INJECT_FROM)}, got {inject_from!r}")
    if guidance_smooth < 0:
        raise ValueError(f"guidance_smooth must be >= 0 (0: raw gradient), got {guidance_smooth}")
    if guidance_scale < 0.0:
        raise ValueError(f"guidance_scale must be >= 0 (0: off), got {guidance_scale}")
    if guidance_scale > 0.0 and bias_model is None:
        raise ValueError(
            "guidance_scale > 0 needs bias_model: the bias stage's checkpoint "
            "(e.g. runs/<ds>/<pct>/bias/checkpoints/best.ckpt)"
        )


def validate_injection_settings(
    num_train_timesteps: int, steps: int, gamma: float, t_edit: int, t_boost: int
) -> None:
    """The knobs' ranges (DESIGN.md): γ ∈ [0, 1], 0 ≤ t_boost ≤ t_edit ≤ T, S divides T."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1] (0: style unchanged, 1: full content), got {gamma}")
    if not 0 <= t_boost <= t_edit <= num_train_timesteps:
        raise ValueError(
            f"need 0 <= t_boost <= t_edit <= T={num_train_timesteps}, got t_boost={t_boost}, t_edit={t_edit}"
        )
    if steps < 1 or num_train_timesteps % steps != 0:
        raise ValueError(f"steps={steps} must divide T={num_train_timesteps} (e.g. 50 or 100 for T=1000)")


def _grid_text(timesteps: list[int]) -> str:
    if len(timesteps) <= 3:
        return f"τ = {timesteps}"
    return f"τ = {', '.join(str(t) for t in timesteps[:3])}, …, {timesteps[-1]} (S={len(timesteps)})"


def validate_windows(
    timesteps: list[int],
    gamma: float,
    t_edit: int,
    t_start: int | None,
    inject_every: int,
    guidance_scale: float = 0.0,
    guidance_t_min: int = 0,
    guidance_t_max: int | None = None,
) -> None:
    """Refuse an injection (γ > 0) or a guidance (scale > 0) that no step of the DDIM grid would apply."""
    grid = _grid_text(timesteps)
    if gamma > 0.0:
        probe = Injection(torch.zeros(1, len(timesteps)), gamma, t_edit, every=inject_every, t_start=t_start)
        if not any(probe.applies(i, t, len(timesteps)) for i, t in enumerate(timesteps)):
            if t_edit > timesteps[-1]:
                why = f"t_edit={t_edit} is above the last DDIM grid step {timesteps[-1]}"
                fix = f"use t_edit <= {timesteps[-1]}"
            else:
                window = f"{t_edit} <= t <= {t_start if t_start is not None else 'T'}"
                why = f"no grid step in the window {window} is injected with inject_every={inject_every}"
                fix = "widen the window (t_edit / t_start) or lower inject_every"
            raise ValueError(
                f"{why} ({grid}): gamma={gamma} would never be applied; {fix}, or set gamma: 0 for a plain "
                "regeneration"
            )
    if guidance_scale > 0.0:
        if guidance_t_min < 0 or (guidance_t_max is not None and guidance_t_max < guidance_t_min):
            raise ValueError(
                f"need 0 <= guidance_t_min <= guidance_t_max, got {guidance_t_min}, {guidance_t_max}"
            )
        top = guidance_t_max if guidance_t_max is not None else timesteps[-1]
        if not any(guidance_t_min <= t <= top for t in timesteps):
            raise ValueError(
                f"guidance window {guidance_t_min} <= t <= {guidance_t_max} holds no DDIM grid step "
                f"({grid}): guidance_scale={guidance_scale} would never be applied; widen the window"
            )


def validate_batching(micro_batch: int | None, content_cache_mb: float | None) -> None:
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1 (null: the loader's batch_size), got {micro_batch}")
    if content_cache_mb is not None and content_cache_mb < 0:
        raise ValueError(
            f"content_cache_mb must be >= 0 (0: no cache, null: unbounded), got {content_cache_mb}"
        )
