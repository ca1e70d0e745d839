"""Loss functions and the LfF re-weighting math, as pure functions (unit-tested on CPU).

GCE (Zhang & Sabuncu 2018, as used by LfF/DisEnt/BE/DiffInject with q = 0.7):
    L_GCE = (1 − p_y^q) / q,   ∂L_GCE/∂θ = p_y^q · ∂CE/∂θ.
We implement it as CE · p_y^q with p_y **detached**, which has exactly that gradient (DESIGN.md). The
reference code multiplies by an extra q (CE · q · p_y^q, research §8, LfF issue #3): a constant factor that
Adam cancels almost exactly (Adam is invariant to loss scale up to its ε), so we leave it out and the loss
value stays comparable to CE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_REDUCTIONS = ("none", "mean", "sum")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {_REDUCTIONS}")


def check_gce_q(q: float) -> float:
    """GCE's q must lie in (0, 1]: q → 0 is CE, q > 1 is not a loss the paper's bound holds for."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"GCE q must be in (0, 1], got {q}")
    return q


def gce_loss(
    logits: torch.Tensor, target: torch.Tensor, q: float = 0.7, reduction: str = "none"
) -> torch.Tensor:
    """Generalized cross-entropy: per-sample CE · p_y^q, p_y detached (gradient = that of (1 − p_y^q)/q)."""
    check_gce_q(q)
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    p_y = torch.exp(-ce.detach())  # softmax probability of the target class, without its gradient
    return _reduce(ce * p_y.pow(q), reduction)


def ema_update(
    ema: torch.Tensor, seen: torch.Tensor, index: torch.Tensor, value: torch.Tensor, alpha: float = 0.7
) -> None:
    """LfF per-sample EMA, in place: ema[i] ← α·ema[i] + (1 − α·seen[i])·value; the first visit stores value.

    Duplicate indices in one call (DDP padding) all read the old value, so they count as a single update.
    """
    old = ema[index]
    ema[index] = alpha * old + (1.0 - alpha * seen[index]) * value.to(ema.dtype)
    seen[index] = 1.0


def classwise_max(values: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Max of `values` per class over entries with label in [0, num_classes) (others, e.g. -1, ignored).

    Classes without entries get 0. Values are non-negative losses, so 0 is a neutral start.
    """
    out = torch.zeros(num_classes, dtype=values.dtype, device=values.device)
    valid = (labels >= 0) & (labels < num_classes)
    return out.scatter_reduce(0, labels[valid].long(), values[valid], reduce="amax", include_self=True)


def lff_weights(
    ema_b: torch.Tensor,
    ema_d: torch.Tensor,
    labels: torch.Tensor,
    max_b: torch.Tensor,
    max_d: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """LfF relative difficulty W = CE_b / (CE_b + CE_d + eps), each EMA divided by its class-wise max.

    `ema_b`, `ema_d`, `labels` are the batch's entries; `max_b`, `max_d` the per-class maxima over the whole
    training set. Returned detached: W only scales f_D's loss.
    """
    lb = labels.long()
    norm_b = ema_b / max_b[lb].clamp_min(eps)
    norm_d = ema_d / max_d[lb].clamp_min(eps)
    return (norm_b / (norm_b + norm_d + eps)).detach()


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` over `mask` (all when None); 0 (with a gradient path) when the mask selects nothing.

    BiasEnsemble trains the bias branch on the committee's flagged images only; a batch without any must
    contribute nothing rather than NaN.
    """
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def bias_branch_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    q: float = 0.7,
    kind: str = "gce",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The bias branch's scalar loss: GCE (LfF, DisEnt) or CE (BiasEnsemble's retrained f_B), over `mask`."""
    if kind == "gce":
        per_sample = gce_loss(logits, target, q=q)
    elif kind == "ce":
        per_sample = F.cross_entropy(logits.float(), target, reduction="none")
    else:
        raise ValueError(f"bias loss must be 'gce' or 'ce', got {kind!r}")
    return masked_mean(per_sample, mask)
