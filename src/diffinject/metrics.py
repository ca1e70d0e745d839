"""Grouped accuracy for biased datasets: overall, aligned, conflicting and worst-group (group = label × bias).

One torchmetrics `Metric` keeps correct/total counts per group as sum-reduced states, so it is exact under
DDP (torchmetrics all-reduces the counts) and needs no masking per group. Overall accuracy is micro (every
sample counts once, unknown bias included); aligned/conflicting are micro over the samples whose bias equals /
differs from their label; worst-group is the minimum over non-empty (label, bias) groups; group-mean is the
unweighted mean over non-empty groups (LfF's "unbiased" cell average). Empty selections give NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric

METRIC_NAMES = ("acc", "acc_aligned", "acc_conflicting", "acc_worst_group", "acc_group_mean")
PSEUDO_BALANCED = "val/acc_pseudo_balanced"


def selection_monitor(selection_bias: str | None) -> str:
    """The validation metric `best.ckpt` maximises: pseudo-group balanced with a bias model, else val/acc."""
    return PSEUDO_BALANCED if selection_bias else "val/acc"


class GroupedAccuracy(Metric):
    """Accuracy per (label, bias) group; `bias = -1` (unknown, e.g. synthetic items) counts only in `acc`."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_classes: int, num_bias_classes: int | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.num_bias_classes = int(num_bias_classes if num_bias_classes is not None else num_classes)
        shape = (self.num_classes, self.num_bias_classes)
        self.add_state("correct", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("unknown_correct", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("unknown_total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, bias: torch.Tensor) -> None:
        """`preds`: logits (N × C) or class ids (N); `target`, `bias`: (N) ints, bias -1 = unknown."""
        if preds.ndim == 2:
            preds = preds.argmax(dim=1)
        target, bias = target.long(), bias.long()
        if not preds.shape == target.shape == bias.shape:
            raise ValueError(f"shape mismatch: preds {preds.shape}, target {target.shape}, bias {bias.shape}")
        if target.numel() and (target.min() < 0 or target.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {target.unique().tolist()}")
        if bias.numel() and (bias.min() < -1 or bias.max() >= self.num_bias_classes):
            raise ValueError(f"bias must lie in [-1, {self.num_bias_classes}), got {bias.unique().tolist()}")
        correct = (preds == target).long()
        known = bias >= 0
        # One-hot sums instead of bincount/index_add: deterministic on every device, integers throughout.
        onehot = F.one_hot(target[known] * self.num_bias_classes + bias[known], self.correct.numel())
        self.correct += (onehot * correct[known, None]).sum(0).view_as(self.correct)
        self.total += onehot.sum(0).view_as(self.total)
        self.unknown_correct += correct[~known].sum()
        self.unknown_total += (~known).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        correct, total = self.correct.double(), self.total.double()
        n_all = total.sum() + self.unknown_total
        aligned = torch.zeros_like(total, dtype=torch.bool)
        diag = min(self.num_classes, self.num_bias_classes)
        aligned[torch.arange(diag), torch.arange(diag)] = True
        nonempty = total > 0
        group_acc = correct[nonempty] / total[nonempty]
        nan = torch.tensor(math.nan, dtype=torch.float64, device=total.device)
        return {
            "acc": _ratio(correct.sum() + self.unknown_correct, n_all),
            "acc_aligned": _ratio(correct[aligned].sum(), total[aligned].sum()),
            "acc_conflicting": _ratio(correct[~aligned].sum(), total[~aligned].sum()),
            "acc_worst_group": group_acc.min() if group_acc.numel() else nan,
            "acc_group_mean": group_acc.mean() if group_acc.numel() else nan,
        }


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    num, den = num.double(), den.double()
    return num / den if den > 0 else torch.full_like(den, math.nan)


def to_floats(values: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float | None]:
    """Tensor dict → JSON-ready floats (NaN → None), keys prefixed (e.g. "test/")."""
    out: dict[str, float | None] = {}
    for key, value in values.items():
        number = float(value)
        out[f"{prefix}{key}"] = None if math.isnan(number) else number
    return out


class PseudoGroupAccuracy(Metric):
    """Validation accuracy balanced over groups a *biased model* defines: it agrees with the label or not.

    Label-free model selection: on a biased validation split, plain accuracy rewards the shortcut (the
    aligned majority), so it picks early, biased epochs. The GCE bias model is wrong mostly on
    bias-conflicting images, so "bias model wrong" is an unsupervised stand-in for the conflicting group.
    The score is the mean accuracy of the non-empty groups ("agree", "disagree"); NaN when none.
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, bias_preds: torch.Tensor) -> None:
        """`preds`, `bias_preds`: logits (N × C) or class ids (N) of the model and the bias model."""
        if preds.ndim == 2:
            preds = preds.argmax(dim=1)
        if bias_preds.ndim == 2:
            bias_preds = bias_preds.argmax(dim=1)
        if not preds.shape == target.shape == bias_preds.shape:
            raise ValueError(
                f"shape mismatch: preds {preds.shape}, target {target.shape}, bias_preds {bias_preds.shape}"
            )
        group = F.one_hot((bias_preds != target).long(), 2)  # column 0: bias model right, 1: wrong
        self.correct += (group * (preds == target).long()[:, None]).sum(0)
        self.total += group.sum(0)

    def compute(self) -> torch.Tensor:
        nonempty = self.total > 0
        if not nonempty.any():
            return torch.tensor(math.nan, dtype=torch.float64, device=self.total.device)
        return (self.correct[nonempty].double() / self.total[nonempty].double()).mean()
