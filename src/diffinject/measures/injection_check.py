"""Label-free injection check: did the bias attribute move to the style's, and did the content survive?

For datasets without a probe (BFFHQ, a user's folder) this is how γ, t_edit and the injection mode are chosen.
Nothing here reads a label: both figures use models the pipeline already has, on images only.

- **Bias moved** (per sample): the seed's GCE bias model f_B assigns the synthetic image the class it assigns
  the *style* image, argmax f_B(x_syn) = argmax f_B(x_style). f_B is the model the method trusts to see the
  bias attribute (it is how the top-K contents were chosen), and its prediction on the style stands in for
  the style's bias attribute, so no bias label is needed. `bias_kept_content` is the same test against the
  content image (the content's bias attribute survived). When f_B gives content and style the same class
  both hold at once; `bias_pairs_differ` says how often they differ and the `*_when_differ` rates are the
  informative ones.
- **Content retention** (per sample): read the clean images with the diffusion model's own encoder, the
  U-Net bottleneck h = `unet_encode(unet, to_model_space(x), t).h` at a fixed timestep t (default 0, no
  noise added, so it is deterministic), and call the content retained when the synthetic image's h is
  closer in cosine similarity to its content's h than to its style's h. By default h is instance-normalised
  first (each channel's spatial mean and standard deviation removed): what is left is the spatial layout of
  the features, while the per-channel statistics, which AdaIN-style transfer treats as "style", do not
  count. `*_raw` figures use h as it is.
  Why h and not pixels: pixel distances are dominated by whatever covers most pixels (CMNIST's black
  background, a face's skin tone) and mean nothing across datasets; h is what the generator itself
  represents and edits, it exists for every dataset the pipeline trains a model on, and cosine similarity
  is scale-free, so the same threshold (closer to content than to style) means the same thing everywhere.
- `moved_and_retained`: both at once, the label-free counterpart of the CMNIST probe's
  "content shape + style colour" rate.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffinject.diffusion import to_model_space, unet_encode

#: timestep at which the clean images are read by the U-Net encoder
DEFAULT_FEATURE_T = 0
_EPS = 1e-5


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _check_images(images: Tensor, what: str) -> None:
    if images.ndim != 4:
        raise ValueError(f"{what}: expected images N×C×H×W in [0, 1], got shape {tuple(images.shape)}")


@torch.no_grad()
def predict_probs(net: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Softmax of a classifier taking [0, 1] images, N × classes, fp32 on the CPU."""
    _check_images(images, "predict_probs")
    was_training = net.training
    net.eval()
    device = _device(net)
    out = [
        net(images[i : i + batch_size].to(device).float()).float().softmax(1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def predict_classes(net: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """argmax class of a classifier taking [0, 1] images (normalisation inside), on the CPU as int64."""
    if len(images) == 0:
        _check_images(images, "predict_classes")
        return torch.zeros(0, dtype=torch.long)
    return predict_probs(net, images, batch_size).argmax(1)


def gate_samples(p_style_class: Tensor, min_confidence: float) -> Tensor:
    """Per-sample bool: the synthetic image is kept for training.

    Kept when the bias model gives the class it assigns the *style* image probability ≥ `min_confidence`
    on the synthetic image: the bias attribute moved and landed on something the bias model recognises
    with confidence, rather than a mixture between two attributes (≥ 0.5 implies it is the argmax).
    Content retention is judged per *set* (`gate_folder`): per image, the bottleneck-feature test is too
    noisy to act on (on embedded CMNIST it rejected 38 % of the images the shape probe calls true new
    combinations), but a set that mostly fails it has lost its contents.
    """
    return p_style_class >= min_confidence


def second_view_transfer(
    view_synthetic: Tensor, view_content: Tensor, view_style: Tensor, moved: Tensor
) -> dict[str, Any]:
    """Does a second, independently trained classifier follow the edit the bias model sees?

    Arguments are the second view's predicted classes on the synthetic, content and style images, and the
    bias model's per-sample `moved`. Over the samples the bias model calls moved and the second view tells
    content and style apart: `follows_style` = the second view assigns the synthetic image its class of the
    style, `follows_content` = its class of the content, and `z` = their difference over its standard error
    (paired proportions on the same images: Var = (s + c − (s − c)²) / n, at least 1/n²).

    The method's premise is that the bias model has found a shortcut that a plain ERM model takes too; an
    edit of that shortcut then moves the ERM model to the style's class far more often than it leaves it on
    the content's (embedded CMNIST at 1 %: 53–75 % against 10–23 %, z = 4.4–12.0). When the bias model has
    learned the class itself (or an attribute ERM ignores), its edit half-redraws the class, and the ERM model
    is split between the two (the texture tree: 43 % against 42 %, z = 0.1; at most z = 2.8 over 3 seeds).
    """
    informative = moved.bool() & (view_content != view_style)
    n = int(informative.sum())
    if n == 0:
        return {"n": 0, "follows_style": None, "follows_content": None, "z": None}
    style = float((view_synthetic == view_style)[informative].float().mean())
    content = float((view_synthetic == view_content)[informative].float().mean())
    # floored at one image's worth (1/n²): a perfectly one-sided split is strong evidence, not infinite
    variance = max(style + content - (style - content) ** 2, 1.0 / n) / n
    return {
        "n": n,
        "follows_style": round(style, 6),
        "follows_content": round(content, 6),
        "z": round((style - content) / variance**0.5, 4),
    }


def paired_accuracy(bias_right: Tensor, view_right: Tensor) -> dict[str, Any]:
    """Is the bias model at least as accurate as the second view on the same images (the biased validation
    split)? Per-image bools of each being right; `z` = McNemar's statistic over the images exactly one of
    them gets right, (bias only − view only) / sqrt(bias only + view only), 0 when they never disagree.

    Why it speaks to the premise: on a split biased like the training set, a model that reads a shortcut is
    right on nearly every aligned image, and ERM, which reads the shortcut and some of the class, cannot do
    much better (embedded CMNIST: z = +0.4 to +1.1 at 1 %, seeds 0–2; +0.6 to +1.9 at 5 %, seeds 0–4). A
    "bias" model that has learned the class itself is simply a weaker classifier than ERM there, because GCE
    underfits the hard images (the texture tree: z = −1.4 to −1.8). Where both models are fully biased they
    rarely disagree and z is noise (0–4 discordant images on the background-colour and corner trees).
    """
    if bias_right.shape != view_right.shape:
        shapes = f"{tuple(bias_right.shape)}, {tuple(view_right.shape)}"
        raise ValueError(f"paired_accuracy: shapes differ {shapes}")
    bias_right, view_right = bias_right.bool(), view_right.bool()
    bias_only = int((bias_right & ~view_right).sum())
    view_only = int((view_right & ~bias_right).sum())
    n = int(bias_right.numel())
    discordant = bias_only + view_only
    return {
        "n": n,
        "bias_acc": round(float(bias_right.float().mean()), 6) if n else None,
        "view_acc": round(float(view_right.float().mean()), 6) if n else None,
        "bias_only": bias_only,
        "view_only": view_only,
        "z": round((bias_only - view_only) / discordant**0.5, 4) if discordant else 0.0,
    }


def bias_moved(bias_net: nn.Module, synthetic: Tensor, style: Tensor) -> Tensor:
    """Per-sample bool: the bias model assigns the synthetic image the class it assigns the style image."""
    return predict_classes(bias_net, synthetic) == predict_classes(bias_net, style)


def bias_kept_content(bias_net: nn.Module, synthetic: Tensor, content: Tensor) -> Tensor:
    """Per-sample bool: the bias model assigns the synthetic image the class it assigns the content image."""
    return predict_classes(bias_net, synthetic) == predict_classes(bias_net, content)


@torch.no_grad()
def bottleneck_h(
    unet: nn.Module, images: Tensor, model_size: int, t: int = DEFAULT_FEATURE_T, batch_size: int = 64
) -> Tensor:
    """The U-Net bottleneck h (N×C×h×w, fp32, CPU) of clean [0, 1] images read at timestep t (no noise)."""
    _check_images(images, "bottleneck_h")
    device = _device(unet)
    dtype = next(unet.parameters()).dtype
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model_space(images[i : i + batch_size].float(), model_size).to(device, dtype)
        out.append(unet_encode(unet, x, int(t)).h.float().cpu())
    return torch.cat(out)


def instance_normalise(h: Tensor) -> Tensor:
    """Remove each sample's per-channel spatial mean and std (N×C×h×w; a 1×1 map is returned as it is)."""
    if h.ndim != 4 or h.shape[-1] * h.shape[-2] == 1:
        return h
    mean = h.mean(dim=(2, 3), keepdim=True)
    var = h.var(dim=(2, 3), keepdim=True, unbiased=False)
    return (h - mean) / (var + _EPS).sqrt()


def content_scores(h_synthetic: Tensor, h_content: Tensor, h_style: Tensor, normalise: bool = True) -> dict:
    """Per-sample cosine similarity of the synthetic features to the content's and the style's, and
    `retained` (bool: closer to the content). Features N×… (flattened per sample); `normalise` applies
    `instance_normalise` to 4-D maps first."""
    if not h_synthetic.shape == h_content.shape == h_style.shape:
        raise ValueError(
            f"content_scores: feature shapes differ {tuple(h_synthetic.shape)}, {tuple(h_content.shape)}, "
            f"{tuple(h_style.shape)}"
        )
    prep = instance_normalise if normalise else (lambda h: h)
    syn, con, sty = (prep(h.float()).flatten(1) for h in (h_synthetic, h_content, h_style))
    cos_content = F.cosine_similarity(syn, con, dim=1, eps=1e-8)
    cos_style = F.cosine_similarity(syn, sty, dim=1, eps=1e-8)
    return {"cos_content": cos_content, "cos_style": cos_style, "retained": cos_content > cos_style}


def content_retention(
    unet: nn.Module,
    synthetic: Tensor,
    content: Tensor,
    style: Tensor,
    model_size: int,
    t: int = DEFAULT_FEATURE_T,
    normalise: bool = True,
) -> dict:
    """`content_scores` on the bottleneck h of the three image sets ([0, 1], N×C×H×W at dataset size)."""
    feats = [bottleneck_h(unet, x, model_size, t) for x in (synthetic, content, style)]
    return content_scores(*feats, normalise=normalise)


def _rate(mask: Tensor, where: Tensor | None = None) -> float | None:
    if where is not None:
        mask = mask[where]
    return round(float(mask.float().mean()), 6) if mask.numel() else None


def _mean(values: Tensor) -> float:
    return round(float(values.mean()), 6)


def injection_check(
    bias_net: nn.Module,
    unet: nn.Module,
    synthetic: Tensor,
    content: Tensor,
    style: Tensor,
    model_size: int,
    t: int = DEFAULT_FEATURE_T,
) -> dict[str, Any]:
    """Every figure of the check over N (synthetic, content, style) triples ([0, 1], N×C×H×W).

    Rates are fractions of the N samples (`*_when_differ`: of those where the bias model tells content and
    style apart; None when there are none); cosines are means over the samples.
    """
    n = len(synthetic)
    if not len(content) == len(style) == n:
        raise ValueError(f"injection_check: {n} synthetic, {len(content)} content, {len(style)} style images")
    result: dict[str, Any] = {"n": n, "feature_t": int(t)}
    if n == 0:
        return result
    pred_syn, pred_con, pred_sty = (predict_classes(bias_net, x) for x in (synthetic, content, style))
    moved, kept, differ = pred_syn == pred_sty, pred_syn == pred_con, pred_con != pred_sty
    feats = [bottleneck_h(unet, x, model_size, t) for x in (synthetic, content, style)]
    scores = content_scores(*feats, normalise=True)
    raw = content_scores(*feats, normalise=False)
    result.update(
        {
            "bias_moved": _rate(moved),
            "bias_kept_content": _rate(kept),
            "bias_pairs_differ": _rate(differ),
            "bias_moved_when_differ": _rate(moved, differ),
            "bias_kept_content_when_differ": _rate(kept, differ),
            "content_retention": _rate(scores["retained"]),
            "cos_content": _mean(scores["cos_content"]),
            "cos_style": _mean(scores["cos_style"]),
            "content_retention_raw": _rate(raw["retained"]),
            "cos_content_raw": _mean(raw["cos_content"]),
            "cos_style_raw": _mean(raw["cos_style"]),
            "moved_and_retained": _rate(moved & scores["retained"]),
        }
    )
    return result
