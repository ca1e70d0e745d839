"""Generator quality of an unconditional diffusion model on Colored-MNIST-like data (measurement only).

Three figures tell whether samples look like the data, each with the real images' own value beside it:
- **recognised**: the fraction of images in which the shape probe (`synthetic_set.train_shape_probe`, fit on
  colour-free real digits with task labels) is confident, max softmax ≥ 0.9: a blob or a half-formed
  stroke is read with low confidence, so this counts digit-like shapes;
- **palette_close**: the fraction whose foreground colour direction (`synthetic_set.foreground_colour`, max
  channel 1) lies within `palette_margin()` of the nearest palette colour (≈ 0.083 for the LfF palette:
  half the smallest gap between two palette colours, so a "close" colour belongs to exactly one palette
  entry; real images, coloured with noise of std 0.005, all fall within it). No foreground = not close;
- **frechet**: the (squared, FID convention) Fréchet distance between the probe's hidden activations on
  the samples and on real images. Its floor is the same distance for held-out *real* images of the same
  count: the estimate is biased upwards for small sets, so only equal-size comparisons are meaningful.

The held-out real images are not used to train the probe, like the samples, so their recognised rate and
the floor are what a perfect generator would score. Nothing here selects or trains anything in the product.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffinject.data.cmnist import LFF_COLORS
from diffinject.diffusion import ddim_generate, ddim_timesteps, from_model_space
from diffinject.measures import synthetic_set

#: a digit is recognised when the probe's max softmax probability reaches this
RECOGNISED_THRESHOLD = 0.9


def _numpy_images(images: np.ndarray | Tensor) -> np.ndarray:
    return images.detach().float().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)


# ---------------------------------------------------------------------------------------------- probe
@torch.no_grad()
def probe_outputs(
    probe: nn.Sequential, gray: np.ndarray, batch_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities N×K, hidden activations N×H) of a `build_shape_probe` MLP on gray images.

    The hidden layer (input to the last Linear) is the feature space of the Fréchet distance: it is what
    the probe uses to tell digits apart, so it is sensitive to shape and blind to colour.
    """
    if not isinstance(probe, nn.Sequential) or not isinstance(probe[-1], nn.Linear):
        raise TypeError(
            "probe_outputs expects a Sequential ending in a Linear (synthetic_set.build_shape_probe)"
        )
    was_training = probe.training
    probe.eval()
    x = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))
    probs, hidden = [], []
    for start in range(0, len(x), batch_size):
        h = probe[:-1](x[start : start + batch_size])
        probs.append(probe[-1](h).softmax(dim=1))
        hidden.append(h)
    probe.train(was_training)
    if not probs:
        return np.zeros((0, probe[-1].out_features)), np.zeros((0, probe[-1].in_features))
    return torch.cat(probs).double().numpy(), torch.cat(hidden).double().numpy()


def recognised_rate(probabilities: np.ndarray, threshold: float = RECOGNISED_THRESHOLD) -> float:
    """Fraction of rows whose max probability is ≥ `threshold` (the probe reads a digit with confidence)."""
    probabilities = np.asarray(probabilities)
    return float((probabilities.max(axis=1) >= threshold).mean()) if len(probabilities) else float("nan")


# ---------------------------------------------------------------------------------------------- colour
def palette_close_rate(
    images: np.ndarray | Tensor, palette: np.ndarray = LFF_COLORS, max_distance: float | None = None
) -> float:
    """Fraction of RGB images whose foreground colour is within `max_distance` of a palette colour.

    Distances are in brightness-normalised RGB (`synthetic_set.nearest_palette`); the default threshold is
    `synthetic_set.palette_margin(palette)`, the same "off palette" line the synthetic-set report uses.
    Images without a foreground count as not close (a black sample is not a coloured digit).
    """
    images = _numpy_images(images)
    if len(images) == 0:
        return float("nan")
    limit = synthetic_set.palette_margin(palette) if max_distance is None else float(max_distance)
    _, distance = synthetic_set.nearest_palette(synthetic_set.foreground_colour(images), palette)
    return float((np.nan_to_num(distance, nan=np.inf) <= limit).mean())


# ---------------------------------------------------------------------------------------------- Fréchet
def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Squared Fréchet distance of Gaussians fitted to feature sets a (N×D) and b (M×D), as FID reports it.

    d² = |μ_a − μ_b|² + tr(C_a + C_b − 2 (C_a C_b)^½), with tr (C_a C_b)^½ = tr (C_a^½ C_b C_a^½)^½: the
    inner matrix is symmetric PSD, so a symmetric eigendecomposition gives the trace exactly and stably
    (no complex parts from a general matrix square root, no SciPy dependency).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance needs two N×D sets with N ≥ 2, got {a.shape} and {b.shape}")
    cov_a, cov_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    root_a = _sqrt_psd(cov_a)
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    cross = float(np.sqrt(np.clip(inner, 0.0, None)).sum())
    mean_term = float(((a.mean(axis=0) - b.mean(axis=0)) ** 2).sum())
    return max(mean_term + float(np.trace(cov_a) + np.trace(cov_b)) - 2.0 * cross, 0.0)


# ---------------------------------------------------------------------------------------------- together
def split_held_out(num_images: int, num_held_out: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(reference, held-out) indices: a seeded random `num_held_out` (≤ half) held out of the rest.

    Train the probe on the reference only: samples and held-out images are then equally unseen by the
    probe (and equally many), which makes the floor a fair one."""
    count = min(int(num_held_out), num_images // 2)
    order = np.random.default_rng(seed).permutation(num_images)
    return np.sort(order[count:]), np.sort(order[:count])


def real_quality(
    real_images: np.ndarray | Tensor,
    probe: nn.Sequential,
    held_out: np.ndarray | Tensor,
    *,
    threshold: float = RECOGNISED_THRESHOLD,
    palette: np.ndarray = LFF_COLORS,
    max_distance: float | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """(the held-out real images' own figures, the reference's probe features): computed once per data set.

    `real_images` are the reference (the probe's training images), `held_out` real images the probe has
    not seen, ideally as many as there are samples (`split_held_out`): their figures are what a perfect
    generator would reach, `frechet_floor` included.
    """
    reference, held_out = _numpy_images(real_images), _numpy_images(held_out)
    _, reference_hidden = probe_outputs(probe, synthetic_set.shape_gray(reference))
    held_probs, held_hidden = probe_outputs(probe, synthetic_set.shape_gray(held_out))
    figures = {
        "real_recognised": recognised_rate(held_probs, threshold),
        "real_palette_close": palette_close_rate(held_out, palette, max_distance),
        "frechet_floor": frechet_distance(held_hidden, reference_hidden),
        "num_real": int(len(reference)),
        "num_held_out": int(len(held_out)),
        "recognised_threshold": float(threshold),
        "palette_close_limit": synthetic_set.palette_margin(palette)
        if max_distance is None
        else float(max_distance),
    }
    return figures, reference_hidden


def sample_figures(
    samples: np.ndarray | Tensor,
    probe: nn.Sequential,
    reference_hidden: np.ndarray,
    *,
    threshold: float = RECOGNISED_THRESHOLD,
    palette: np.ndarray = LFF_COLORS,
    max_distance: float | None = None,
) -> dict[str, Any]:
    """recognised, palette_close and frechet (against the reference's features) of [0, 1] RGB samples."""
    samples = _numpy_images(samples)
    probs, hidden = probe_outputs(probe, synthetic_set.shape_gray(samples))
    return {
        "recognised": recognised_rate(probs, threshold),
        "palette_close": palette_close_rate(samples, palette, max_distance),
        "frechet": frechet_distance(hidden, reference_hidden),
        "num_samples": int(len(samples)),
    }


def generator_quality(
    samples: np.ndarray | Tensor,
    real_images: np.ndarray | Tensor,
    probe: nn.Sequential,
    held_out: np.ndarray | Tensor,
    *,
    threshold: float = RECOGNISED_THRESHOLD,
    palette: np.ndarray = LFF_COLORS,
    max_distance: float | None = None,
) -> dict[str, Any]:
    """Every figure for one set of samples ([0, 1] N×3×H×W) beside the real images' own (`real_quality`)."""
    options: dict[str, Any] = {"threshold": threshold, "palette": palette, "max_distance": max_distance}
    real, reference_hidden = real_quality(real_images, probe, held_out, **options)
    return {**sample_figures(samples, probe, reference_hidden, **options), **real}


@dataclass
class QualityReference:
    """A trained probe, the reference's features and the real figures: what every evaluation compares to."""

    probe: nn.Sequential
    reference_hidden: np.ndarray
    real: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)

    def evaluate(self, samples: np.ndarray | Tensor) -> dict[str, Any]:
        """`generator_quality` of `samples` without recomputing the real side."""
        return {**sample_figures(samples, self.probe, self.reference_hidden, **self.options), **self.real}


def build_reference(
    images: np.ndarray | Tensor,
    labels: np.ndarray,
    num_classes: int,
    num_held_out: int,
    *,
    seed: int = 0,
    probe_iterations: int = 150,
    probe_weight_decay: float = 1e-3,
    threshold: float = RECOGNISED_THRESHOLD,
    max_distance: float | None = None,
) -> QualityReference:
    """Hold out `num_held_out` real images (`split_held_out`), train the shape probe on the rest.

    The probe defaults are `synthetic_set.train_shape_probe`'s, so the figures match the h-space probe's.
    """
    images, labels = _numpy_images(images), np.asarray(labels)
    keep, held = split_held_out(len(images), num_held_out, seed)
    gray = synthetic_set.shape_gray(images[keep])
    probe = synthetic_set.train_shape_probe(
        gray, labels[keep], num_classes, iterations=probe_iterations, seed=seed
    )
    options: dict[str, Any] = {"threshold": threshold, "max_distance": max_distance}
    real, hidden = real_quality(images[keep], probe, images[held], **options)
    return QualityReference(probe, hidden, real, options)


def dataset_arrays(
    dataset: Any, max_images: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(images N×C×H×W float32, labels) from a dataset of `{"image", "label"}` items (a seeded subset)."""
    indices = np.arange(len(dataset))
    if max_images is not None and len(indices) > max_images:
        indices = np.sort(np.random.default_rng(seed).choice(indices, max_images, replace=False))
    items = [dataset[int(i)] for i in indices]
    images = torch.stack([item["image"].float() for item in items]).numpy()
    return images, np.array([int(item["label"]) for item in items], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- sampling
class ClippedEpsilon(nn.Module):
    """ε re-derived from x̂₀ clipped to [−1, 1] (diffusers' `clip_sample`); exposes the UNet's mid_block."""

    def __init__(self, unet: nn.Module, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.unet, self.mid_block = unet, unet.mid_block
        self.alphas_cumprod = alphas_cumprod

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.unet(x, t)
        eps = (out.sample if hasattr(out, "sample") else out)[:, : x.shape[1]].to(x.dtype)
        abar = self.alphas_cumprod.to(x.device)[t].to(x.dtype).view(-1, 1, 1, 1)
        x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1.0, 1.0)
        return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


@torch.no_grad()
def sample_unconditional(
    unet: nn.Module,
    alphas_cumprod: Tensor,
    num_samples: int,
    steps: int = 50,
    seed: int = 0,
    clip: bool = False,
    image_size: int | None = None,
    batch_size: int = 64,
) -> Tensor:
    """Deterministic (η = 0) DDIM samples from seeded Gaussian noise, as [0, 1] images on the CPU.

    A fixed seed gives the same x_T at every call, so figures logged during training follow the model,
    not the noise. `image_size` crops/resizes back from the model size (28 for CMNIST's 32 px UNet);
    `clip` clips x̂₀ to [−1, 1] on every step. The UNet runs in eval mode, fp32; its mode is restored.
    x_T is drawn at once, so the batch size (64: the cheapest per sample on one CPU thread) changes nothing.
    """
    config = unet.config
    size, channels = int(config.sample_size), int(config.in_channels)
    device = next(unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((num_samples, channels, size, size), generator=generator)
    grid = ddim_timesteps(len(alphas_cumprod), steps)
    model: nn.Module = ClippedEpsilon(unet, alphas_cumprod) if clip else unet
    was_training = unet.training
    unet.eval()
    out = []
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            for start in range(0, num_samples, max(1, batch_size)):
                x = ddim_generate(model, x_T[start : start + batch_size].to(device), alphas_cumprod, grid)
                out.append(from_model_space(x, image_size or size).cpu())
    finally:
        unet.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, channels, image_size or size, image_size or size)
