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

from diffinject.diffusion.preprocess import from_model_space


def model_to_image(x: Tensor, image_size: int) -> Tensor:
    """Model space → image space at `image_size`, differentiable and unclamped (`from_model_space`)."""
    return from_model_space(x, image_size, clamp=False)


def box_blur(x: Tensor, radius: int) -> Tensor:
    """Mean over a (2r+1)² window per channel, same size (edges averaged over the cells inside)."""
    if radius <= 0:
        return x
    return F.avg_pool2d(x, 2 * radius + 1, stride=1, padding=radius, count_include_pad=False)


#: SSIM's stabiliser for the structure term, (0.03 · dynamic range)² / 2 with the model space's range of 2
STRUCTURE_C = (0.03 * 2.0) ** 2 / 2.0


def structure_similarity(x: Tensor, reference: Tensor, radius: int = 3) -> Tensor:
    """Per-sample mean of SSIM's structure term (σ_xy + C)/(σ_x σ_y + C) over local windows and channels.

    The term is a local normalised cross-correlation: it ignores each window's mean and contrast per
    channel and scores only the pattern, so "the same structure rendered differently" scores 1. Used as
    a content-preservation objective that leaves the appearance free to change. Range [−1, 1].
    """

    def blur(v: Tensor) -> Tensor:
        return box_blur(v, radius)

    mean_x, mean_r = blur(x), blur(reference)
    var_x = (blur(x * x) - mean_x**2).clamp_min(0.0)
    var_r = (blur(reference * reference) - mean_r**2).clamp_min(0.0)
    cov = blur(x * reference) - mean_x * mean_r
    s = (cov + STRUCTURE_C) / (var_x.sqrt() * var_r.sqrt() + STRUCTURE_C)
    return s.flatten(1).mean(dim=1)


def _rms_normalised(g: Tensor) -> Tensor:
    return g / g.flatten(1).pow(2).mean(dim=1).sqrt().clamp_min(1e-12).view(-1, 1, 1, 1)


def classifier_guidance_fn(
    classifier: nn.Module,
    target: Tensor,
    image_size: int,
    fade: bool = True,
    smooth: int = 0,
    reference: Tensor | None = None,
    structure_weight: float = 0.0,
) -> Callable[[Tensor], Tensor]:
    """x̂₀ ↦ the per-sample RMS-normalised gradient of log p(target | x̂₀), times (1 − p) when `fade`.

    Normalising makes the guidance scale a step size in model-space units whatever the classifier's
    gradient magnitude; the (1 − p) factor lets a sample that already shows the target stop moving, so
    guidance does not keep pushing an adversarial direction once the attribute has changed. `smooth` = r
    box-blurs the gradient over (2r+1)² pixels first: a smoothness prior on the edit (a classifier's raw
    pixel gradient also carries fine stroke templates of the target class, which would redraw the content).

    With a `reference` (the content image, model space) and `structure_weight` w > 0, the direction adds
    w · (1 − S) times the normalised gradient of `structure_similarity(x̂₀, reference)`: the classifier
    changes what it reads while the content's local structure is pulled back, so the edit goes to the
    attribute the classifier uses rather than redrawing the content as a template of the target class.
    """
    if structure_weight > 0.0 and reference is None:
        raise ValueError("classifier_guidance_fn: structure_weight > 0 needs a reference image")

    def grad(x0: Tensor) -> Tensor:
        # clones: tensors made under inference mode (Lightning's predict) cannot take part in autograd
        x = x0.detach().clone().requires_grad_(True)
        logits = classifier(model_to_image(x, image_size).clamp(-0.5, 1.5))
        index = target.clone().view(-1, 1).to(logits.device)
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, index)
        (g,) = torch.autograd.grad(log_p.sum(), x)
        g = _rms_normalised(box_blur(g, smooth))
        if fade:
            g = g * (1.0 - log_p.detach().exp()).view(-1, 1, 1, 1)
        if structure_weight > 0.0:
            assert reference is not None
            x = x0.detach().clone().requires_grad_(True)
            similarity = structure_similarity(x, reference.clone().to(x))
            (g_s,) = torch.autograd.grad(similarity.sum(), x)
            fade_s = (1.0 - similarity.detach()).clamp_min(0.0).view(-1, 1, 1, 1)
            g = g + structure_weight * fade_s * _rms_normalised(g_s)
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
