"""Inverting images into a StyleGenerator's W space (A² step 3), as pure functions.

A²'s projector (a modified StyleGAN2 projector) fits one latent per image with Adam from the mean w under a
cosine learning-rate ramp (up over the first 5 %, down over the last 25 %), with an LPIPS loss. Here: batched
(every image its own w; the loss is a sum of per-image terms and Adam is elementwise, so an image's result
does not depend on which images share its batch), pixel MSE in model space instead of LPIPS (no pretrained
VGG offline; research note §3), optionally plus an L2 between the bias classifier's penultimate features of
the rendering and of the target; latent noise and noise-map regularisation configured away (our generator
has no noise inputs). W (one w for every layer) by default, W+ optional.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from diffinject.diffusion.preprocess import from_model_space
from diffinject.nets.gan_style import StyleGenerator

FeatureFn = Callable[[Tensor], Tensor]


@dataclass
class Inversion:
    """The fitted latents and each image's loss before the first and after the last step."""

    w: Tensor
    loss_initial: Tensor
    loss_final: Tensor


def projector_lr(step: int, steps: int, lr: float, rampup: float = 0.05, rampdown: float = 0.25) -> float:
    """StyleGAN2's projector schedule: cosine ramp-down over the last `rampdown`, linear ramp-up first.

    The ramp-up reads (step + 1) / steps, so the first step already moves (the projector's t = 0 wastes it).
    """
    t = (step + 1) / steps
    down = min(1.0, (1.0 - step / steps) / rampdown) if rampdown > 0 else 1.0
    ramp = 0.5 - 0.5 * math.cos(down * math.pi)
    return lr * ramp * (min(1.0, t / rampup) if rampup > 0 else 1.0)


def penultimate_features(net: nn.Module, image_size: int) -> FeatureFn:
    """model-space images → the input of `net`'s last Linear layer (its penultimate features).

    Works for every classifier of `nets.classifiers` (the MLP's last Linear, ResNet-18's fc). The images go
    to data space unclamped so the gradient reaches pixels the generator pushes past [-1, 1].
    """
    last = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError(f"{type(net).__name__} has no Linear layer to read penultimate features from")
    captured: list[Tensor] = []

    def hook(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        captured.append(inputs[0])

    def features(x: Tensor) -> Tensor:
        handle = last[-1].register_forward_pre_hook(hook)
        try:
            net(from_model_space(x, image_size, clamp=False))
        finally:
            handle.remove()
        return captured.pop().flatten(1)

    return features


def invert(
    generator: StyleGenerator,
    targets: Tensor,
    start_w: Tensor,
    steps: int,
    lr: float,
    w_plus: bool = False,
    feature_fn: FeatureFn | None = None,
    feature_weight: float = 0.0,
    rampup: float = 0.05,
    rampdown: float = 0.25,
) -> Inversion:
    """Fit w (B×w_dim, or B×num_ws×w_dim with `w_plus`) so that `generator.synthesis(w)` matches `targets`.

    `targets`: B×C×S×S model-space images; `start_w`: 1×w_dim (the mean w). Per-image loss = mean squared
    pixel error + `feature_weight` × mean squared difference of `feature_fn` features. Runs with gradients
    even inside Lightning's predict (inference mode switched off locally); the generator is not changed.
    """
    if steps < 1 or not lr > 0:
        raise ValueError(f"inversion needs steps >= 1 and lr > 0, got {steps}, {lr}")
    if feature_weight > 0 and feature_fn is None:
        raise ValueError("feature_weight > 0 needs a feature function (the bias model)")
    with torch.inference_mode(False), torch.enable_grad():
        target = targets.detach().clone()
        start = start_w.detach().clone().reshape(1, -1)
        batch = target.shape[0]
        w0 = start[:, None, :].expand(batch, generator.num_ws, -1) if w_plus else start.expand(batch, -1)
        w = w0.clone().requires_grad_(True)
        target_feats = None
        if feature_weight > 0 and feature_fn is not None:
            with torch.no_grad():
                target_feats = feature_fn(target)

        def per_image(latent: Tensor) -> Tensor:
            images = generator.synthesis(latent)
            loss = (images - target).pow(2).flatten(1).mean(dim=1)
            if target_feats is not None and feature_fn is not None:
                loss = loss + feature_weight * (feature_fn(images) - target_feats).pow(2).mean(dim=1)
            return loss

        optimizer = torch.optim.Adam([w], lr=lr, betas=(0.9, 0.999))
        initial = None
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = projector_lr(step, steps, lr, rampup, rampdown)
            loss = per_image(w)
            if initial is None:
                initial = loss.detach()
            optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()  # a sum: each image's gradient is its own
            optimizer.step()
        with torch.no_grad():
            final = per_image(w)
    assert initial is not None
    return Inversion(w.detach(), initial, final.detach())
