"""Steering a regeneration beyond h-space: classifier guidance on x̂₀ and initial-latent statistics.

Both start from the *content* image's inverted x_T (which alone regenerates the content exactly) and change
only what a bias-aware signal asks for, so the content's task-relevant structure survives:
- `classifier_guidance_fn`: the ascent direction of log p(target | x̂₀) under a classifier — with the seed's
  GCE bias model and the class it assigns the style image, "give the content the style's bias attribute".
  Label-free (the bias model is trained without bias labels) and attribute-agnostic: it moves whatever the
  bias model reads (colour on Colored MNIST, gender on BFFHQ), nothing named by us.
- `match_channel_stats`: AdaIN on the initial latent (as StyleID does): the content's x_T re-normalised to
  the style's per-channel mean and std.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def model_to_image(x: Tensor, image_size: int) -> Tensor:
    """Model space [-1, 1] → image space [0, 1] at `image_size`, differentiable (crop/resize, no clamp)."""
    size = x.shape[-1]
    if image_size < size:
        before = (size - image_size) // 2
        x = x[..., before : before + image_size, before : before + image_size]
    elif image_size > size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return (x + 1.0) / 2.0


def classifier_guidance_fn(
    classifier: nn.Module, target: Tensor, image_size: int, fade: bool = True
) -> Callable[[Tensor], Tensor]:
    """x̂₀ ↦ the per-sample RMS-normalised gradient of log p(target | x̂₀), times (1 − p) when `fade`.

    Normalising makes the guidance scale a step size in model-space units whatever the classifier's
    gradient magnitude; the (1 − p) factor lets a sample that already shows the target stop moving, so
    guidance does not keep pushing an adversarial direction once the attribute has changed.
    """

    def grad(x0: Tensor) -> Tensor:
        x = x0.detach().requires_grad_(True)
        logits = classifier(model_to_image(x, image_size).clamp(-0.5, 1.5))
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, target.view(-1, 1).to(logits.device))
        (g,) = torch.autograd.grad(log_p.sum(), x)
        rms = g.flatten(1).pow(2).mean(dim=1).sqrt().clamp_min(1e-12).view(-1, 1, 1, 1)
        g = g / rms
        if fade:
            g = g * (1.0 - log_p.detach().exp()).view(-1, 1, 1, 1)
        return g

    return grad


def match_channel_stats(x: Tensor, reference: Tensor, weight: float = 1.0) -> Tensor:
    """x re-normalised to `reference`'s per-sample, per-channel mean and std (AdaIN), blended by `weight`."""
    if x.shape != reference.shape or x.ndim != 4:
        raise ValueError(
            f"match_channel_stats: need one B×C×H×W shape, got {tuple(x.shape)} and {tuple(reference.shape)}"
        )
    mean_x, std_x = x.mean(dim=(2, 3), keepdim=True), x.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    mean_r, std_r = reference.mean(dim=(2, 3), keepdim=True), reference.std(dim=(2, 3), keepdim=True)
    moved = (x - mean_x) / std_x * std_r + mean_r
    return x + weight * (moved - x)
