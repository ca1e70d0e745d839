"""Losses and augmentation for the two GAN baselines (issue 22), as pure functions (no Lightning).

- A² (StyleGAN2-lite, `nets.gan_style`): the non-saturating logistic G/D losses, the R1 penalty, and the
  cross-domain distance-consistency loss of Ojha et al. (CVPR 2021) for the adaptation to the top-K.
- AmpliBias (FastGAN-lite, `nets.gan_fast`): FastGAN's hinge D loss with soft labels, its G loss, the
  reconstruction loss of the self-supervised discriminator, and DiffAugment (Zhao et al., NeurIPS 2020)
  on real and fake images, without horizontal flips (a mirrored digit is another glyph).
Every image tensor is in model space: B×C×S×S in [-1, 1] (`nets.gan`).
Randomness goes through an optional `torch.Generator` on the tensors' device, so a seeded call repeats.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from diffinject.nets.gan import quarter_crop

AUGMENTATIONS = ("color", "translation", "cutout")
KL_REDUCTIONS = ("mean", "batchmean")
RECONSTRUCTION_KINDS = ("mse", "l1")


# --- non-saturating logistic GAN (StyleGAN2, A²) ---------------------------------------------------------


def logistic_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """D loss: softplus(−D(real)) + softplus(D(fake)), each averaged (= BCE with labels 1 and 0)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def nonsaturating_g_loss(fake_logits: Tensor) -> Tensor:
    """G loss: softplus(−D(fake)), averaged: −log σ(D) keeps a strong gradient while D wins (log(1−σ) not)."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_images: Tensor, real_logits: Tensor) -> Tensor:
    """R1: mean over images of ‖∇ₓ D(x)‖² at real x, with a graph so D can be trained on it.

    `real_images` must have `requires_grad` set before they went through D (and any augmentation).
    StyleGAN2 adds `r1_gamma / 2 · penalty · d_reg_every` to the D loss every `d_reg_every` steps
    (A²/CDC: gamma 10, every 16); the weighting is the caller's.
    """
    if not real_images.requires_grad:
        raise ValueError("r1_penalty needs real_images.requires_grad_(True) before the discriminator forward")
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.pow(2).flatten(1).sum(dim=1).mean()


# --- FastGAN hinge with soft labels (AmpliBias) ----------------------------------------------------------


def _soft_labels(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform labels in [0.8, 1.0), one per logit: FastGAN's label smoothing for the hinge margin."""
    return torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype) * 0.2 + 0.8


def soft_hinge_d_real(real_logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """D loss on real logits: mean relu(u − p), u ~ U[0.8, 1): between mean relu(0.8 − p) and relu(1 − p)."""
    return F.relu(_soft_labels(real_logits, generator) - real_logits).mean()


def soft_hinge_d_fake(fake_logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """D loss on fake logits: mean relu(u + pred), u ~ U[0.8, 1): zero once every fake logit is ≤ −1."""
    return F.relu(_soft_labels(fake_logits, generator) + fake_logits).mean()


def soft_hinge_d_loss(
    real_logits: Tensor, fake_logits: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Both D hinge terms summed (FastGAN backpropagates them separately; the sum has the same gradient)."""
    return soft_hinge_d_real(real_logits, generator) + soft_hinge_d_fake(fake_logits, generator)


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """FastGAN's G loss: −mean D(fake) (unbounded below; D's hinge is what keeps logits in range)."""
    return -fake_logits.mean()


# --- self-supervised discriminator reconstruction (AmpliBias) --------------------------------------------


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] > size:  # area = exact box average for the power-of-two factors used here
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def reconstruction_targets(real: Tensor, part: int, size: int) -> tuple[Tensor, Tensor]:
    """What the discriminator's decoders should produce: the whole image and quarter `part`, at `size`."""
    return _resize(real, size), _resize(quarter_crop(real, part), size)


def reconstruction_loss(
    rec_whole: Tensor, rec_part: Tensor, real: Tensor, part: int, kind: str = "mse"
) -> Tensor:
    """Pixel loss (MSE or L1) of both reconstructions against `reconstruction_targets`, summed.

    FastGAN uses LPIPS here; no pretrained perceptual network is available offline, so a pixel loss
    stands in (research note). `part` must be the quarter passed to `forward_with_reconstruction`.
    """
    if kind not in RECONSTRUCTION_KINDS:
        raise ValueError(f"unknown reconstruction loss {kind!r}; expected one of {RECONSTRUCTION_KINDS}")
    whole, quarter = reconstruction_targets(real, part, rec_whole.shape[-1])
    loss = F.mse_loss if kind == "mse" else F.l1_loss
    return loss(rec_whole, whole) + loss(rec_part, quarter)


# --- cross-domain distance consistency (CDC, A²'s adaptation) --------------------------------------------


def random_anchor_layers(
    num_features: int, batch: int, generator: torch.Generator | None = None
) -> list[int]:
    """One feature-map index per anchor, uniform over all maps but the first (the 4×4 one), as CDC draws."""
    if num_features < 2:
        raise ValueError(f"need at least 2 feature maps to skip the first, got {num_features}")
    return torch.randint(1, num_features, (batch,), generator=generator).tolist()


def _similarity_rows(features: Sequence[Tensor], anchor_layers: Sequence[int]) -> Tensor:
    """N×(N−1): row i = cosine similarities of sample i to every other sample, in layer anchor_layers[i]."""
    rows = []
    for i, layer in enumerate(anchor_layers):
        flat = features[layer].flatten(1)
        sims = F.cosine_similarity(flat[i : i + 1], flat, dim=1)
        rows.append(torch.cat([sims[:i], sims[i + 1 :]]))
    return torch.stack(rows)


def distance_consistency_loss(
    source_feats: Tensor | Sequence[Tensor],
    target_feats: Tensor | Sequence[Tensor],
    anchor_layers: Sequence[int] | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Cross-domain distance consistency: the adapted generator keeps the source's pairwise similarities.

    For N ≥ 3 images rendered from the same latents by the source and the target (adapted) generator:
    per image i, P(i) = softmax over j ≠ i of cos(f_i, f_j) (features flattened), for each generator; the
    loss is KL(P_source(i) ‖ P_target(i)) = Σ_j P_s log(P_s / P_t), i.e. the cross-entropy of the target's
    distribution under the source's. That is what Ojha et al.'s `train.py` computes
    (`nn.KLDivLoss()(log P_target, P_source)`, source under `no_grad`) although the research note writes
    KL(target ‖ source): we follow the code that produced their results. With the source fixed its gradient
    in the target's similarities is P_t − P_s, which vanishes exactly at agreement.
    `reduction="mean"` is that code's default: the pointwise terms averaged over all N(N−1) entries (so
    CDC's weight `kl_wt` = 1000 applies unchanged); `"batchmean"` is the per-anchor KL averaged over anchors
    (= "mean" × (N − 1)).

    Features: one tensor N×… (one layer for all anchors), or a list of per-layer tensors (as
    `StyleGenerator.synthesis(..., return_features=True)` returns) with `anchor_layers` naming each
    anchor's layer (`random_anchor_layers`: CDC draws one per anchor, never the first map). The source side
    is detached: the source generator is the fixed reference.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {KL_REDUCTIONS}")
    if isinstance(source_feats, Tensor) != isinstance(target_feats, Tensor):
        raise ValueError("source_feats and target_feats must both be tensors or both be lists of tensors")
    source_list = [source_feats] if isinstance(source_feats, Tensor) else list(source_feats)
    target_list = [target_feats] if isinstance(target_feats, Tensor) else list(target_feats)
    batch = source_list[0].shape[0]
    if batch < 3:
        raise ValueError(f"distance consistency needs at least 3 shared latents, got {batch}")
    if len(source_list) != len(target_list):
        raise ValueError(f"source has {len(source_list)} feature maps, target {len(target_list)}")
    if anchor_layers is None:
        if len(source_list) != 1:
            raise ValueError("with lists of feature maps, pass anchor_layers (one layer index per sample)")
        anchor_layers = [0] * batch
    if len(anchor_layers) != batch:
        raise ValueError(f"anchor_layers has {len(anchor_layers)} entries for {batch} samples")
    for layer in set(anchor_layers):
        if source_list[layer].shape != target_list[layer].shape:
            raise ValueError(
                f"layer {layer}: source features {tuple(source_list[layer].shape)}, "
                f"target {tuple(target_list[layer].shape)}"
            )
    source_probs = F.softmax(_similarity_rows([f.detach() for f in source_list], anchor_layers), dim=1)
    target_log_probs = F.log_softmax(_similarity_rows(target_list, anchor_layers), dim=1)
    # written out rather than F.kl_div: its "mean" warns and is announced to turn into "batchmean"
    pointwise = torch.xlogy(source_probs, source_probs) - source_probs * target_log_probs
    return pointwise.mean() if reduction == "mean" else pointwise.sum() / batch


# --- DiffAugment (both baselines' discriminators) --------------------------------------------------------


def parse_policy(policy: str) -> list[str]:
    """'color,translation' → ['color', 'translation']; unknown names are an error (e.g. 'flip': never)."""
    names = [name.strip() for name in policy.split(",") if name.strip()]
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ValueError(
            f"unknown DiffAugment policy {unknown}; expected names from {AUGMENTATIONS} "
            "(no flip: it would mirror digits)"
        )
    return names


def _uniform(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device, dtype=x.dtype)


def _color(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """DiffAugment's colour: brightness + U(−0.5, 0.5), saturation × U(0, 2), contrast × U(0.5, 1.5)."""
    x = x + (_uniform(x, generator) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(x, generator) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x, generator) + 0.5) + mean


def _translation(x: Tensor, ratio: float, fill: float, generator: torch.Generator | None) -> Tensor:
    """Shift each image by whole pixels, up to `ratio` of its side each way; uncovered pixels get `fill`."""
    batch, _, height, width = x.shape
    max_dy, max_dx = int(height * ratio + 0.5), int(width * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (batch, 1), generator=generator, device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (batch, 1), generator=generator, device=x.device)
    padded = F.pad(x, (max_dx, max_dx, max_dy, max_dy), value=fill)
    rows = torch.arange(height, device=x.device)[None, :] + max_dy - dy  # output row r reads input r − dy
    cols = torch.arange(width, device=x.device)[None, :] + max_dx - dx
    picked = padded[
        torch.arange(batch, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]
    ]
    return picked.permute(0, 3, 1, 2)  # advanced indexing put the channels last


def _cutout(x: Tensor, ratio: float, fill: float, generator: torch.Generator | None) -> Tensor:
    """Set one square of side `ratio`·size per image, at a uniform centre (may overhang), to `fill`."""
    batch, _, height, width = x.shape
    size_y, size_x = int(height * ratio + 0.5), int(width * ratio + 0.5)
    cy = torch.randint(0, height + (1 - size_y % 2), (batch, 1, 1), generator=generator, device=x.device)
    cx = torch.randint(0, width + (1 - size_x % 2), (batch, 1, 1), generator=generator, device=x.device)
    ys = torch.arange(height, device=x.device)[None, :, None] - (cy - size_y // 2)
    xs = torch.arange(width, device=x.device)[None, None, :] - (cx - size_x // 2)
    inside = (ys >= 0) & (ys < size_y) & (xs >= 0) & (xs < size_x)
    return torch.where(inside[:, None], torch.full_like(x, fill), x)


def diff_augment(
    x: Tensor,
    policy: str = "color,translation",
    generator: torch.Generator | None = None,
    *,
    translation_ratio: float = 0.125,
    cutout_ratio: float = 0.5,
    fill: float = -1.0,
) -> Tensor:
    """Differentiable augmentation (DiffAugment) of model-space images, fresh random parameters per image.

    Apply it to every image the discriminator sees, real and fake alike (G's gradient flows through it),
    so D cannot tell them apart by augmentation and cannot memorise the few real images. Operations in
    `policy` order: 'color' (brightness, saturation, contrast), 'translation' (±`translation_ratio` of the
    side, whole pixels), 'cutout' (a square of `cutout_ratio` of the side). No horizontal flip, ever:
    it mirrors digits. Pixels uncovered by translation and cut out get `fill`, −1 (black) by default, the
    value `to_model_space` pads 28-px digits with (DiffAugment fills 0, mid-grey in [-1, 1]).
    """
    for name in parse_policy(policy):
        if name == "color":
            x = _color(x, generator)
        elif name == "translation":
            x = _translation(x, translation_ratio, fill, generator)
        else:
            x = _cutout(x, cutout_ratio, fill, generator)
    return x.contiguous()
