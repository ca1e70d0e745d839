"""Grouped accuracy for biased datasets: overall, aligned, conflicting and worst-group (group = label × bias).

One torchmetrics `Metric` keeps correct/total counts per group as sum-reduced states, so it is exact under
DDP (torchmetrics all-reduces the counts) and needs no masking per group. Overall accuracy is micro (every
sample counts once, unknown bias included); aligned/conflicting are micro over the samples whose bias equals /
differs from their label; worst-group is the minimum over non-empty (label, bias) groups; group-mean is the
unweighted mean over non-empty groups (LfF's "unbiased" cell average). Empty selections give NaN.

Worst class (conflicting) is the lowest per-label accuracy on the bias-conflicting images (labels without any
skipped). Why: with many small groups (Colored MNIST: 10 × 10 groups of ~10 test images) some group is at 0 %
for every method, so worst-group tells nothing apart; a label's conflicting images pool its groups (~90
images there). `group_counts` gives the raw (label, bias) matrix, which `metrics.json` keeps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics import Metric

METRIC_NAMES = (
    "acc",
    "acc_aligned",
    "acc_conflicting",
    "acc_worst_group",
    "acc_group_mean",
    "acc_conflicting_worst_class",
)
PSEUDO_BALANCED = "val/acc_pseudo_balanced"
#: the effective size Σw of the pseudo-conflicting validation group (see `PseudoGroupAccuracy`)
PSEUDO_CONFLICTING_SIZE = "val/pseudo_conflicting_size"
#: the binomial standard error of that score at an epoch (`pseudo_balanced_se`)
PSEUDO_BALANCED_SE = "val/acc_pseudo_balanced_se"
#: default minimum of that size for the pseudo-group rule to select checkpoints (`selection_fallback`)
SELECTION_MIN_GROUP = 16.0
#: default margin, in standard errors, by which an earlier epoch must beat the last one (`keep_last_epoch`)
SELECTION_MARGIN_SE = 1.0


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
        # per label, over its bias-conflicting images only; labels without any are left out of the minimum
        class_correct = correct.masked_fill(aligned, 0).sum(1)
        class_total = total.masked_fill(aligned, 0).sum(1)
        has_conflicting = class_total > 0
        class_acc = class_correct[has_conflicting] / class_total[has_conflicting]
        return {
            "acc": _ratio(correct.sum() + self.unknown_correct, n_all),
            "acc_aligned": _ratio(correct[aligned].sum(), total[aligned].sum()),
            "acc_conflicting": _ratio(correct[~aligned].sum(), total[~aligned].sum()),
            "acc_worst_group": group_acc.min() if group_acc.numel() else nan,
            "acc_group_mean": group_acc.mean() if group_acc.numel() else nan,
            "acc_conflicting_worst_class": class_acc.min() if class_acc.numel() else nan,
        }

    def group_counts(self) -> dict[str, list[list[int]]]:
        """Correct / total test images per (label, bias) group (rows: label, columns: bias), for metrics.json:
        the report derives its figures from the raw counts and keeps the matrix in results.json. Summed over
        ranks under DDP (a collective: call it on every rank)."""
        with self.sync_context():
            return {"correct": self.correct.tolist(), "total": self.total.tolist()}


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
    """Validation accuracy balanced over two groups a *biased model* defines, softly: "it is right" / "wrong".

    Label-free model selection: on a biased validation split, plain accuracy rewards the shortcut (the aligned
    majority), so it picks early, biased epochs. The GCE bias model fails mostly on bias-conflicting images,
    so its failures stand in for the conflicting group. Each image belongs to the pseudo-conflicting group
    with weight w = 1 − p_B(label | image) (the bias model's softmax) and to the pseudo-aligned group with
    1 − w; the score is the mean of the two weighted accuracies (of the groups with any weight).

    Why soft: a hard right/wrong split flips images in and out on tiny probability changes and ignores how
    sure the bias model is; the soft weights give the same groups when the bias model is confident (GCE makes
    it so) and a smooth, stable score otherwise. `conflicting_size` = Σw is the group's effective size;
    `selection_fallback` uses the smaller of it and `wrong_count`, the number of images the bias model's
    argmax gets wrong: an unsure bias model spreads weight over many aligned images, which inflates Σw
    without adding one image that is really bias-conflicting (the background-colour tree: Σw = 62–76, and a
    fully biased epoch 1 outscored every later one). Given class ids instead of logits for the bias model,
    w is 0/1 (the hard rule).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        # index 0: pseudo-aligned (bias model right), 1: pseudo-conflicting (bias model wrong)
        self.add_state("weight", torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("wrong_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, bias_preds: torch.Tensor) -> None:
        """`preds`: logits (N × C) or ids (N); `bias_preds`: the bias model's logits (soft) or ids (hard)."""
        if preds.ndim == 2:
            preds = preds.argmax(dim=1)
        n = target.shape[0]
        if not preds.shape == target.shape or bias_preds.shape[0] != n or bias_preds.ndim > 2:
            raise ValueError(
                f"shape mismatch: preds {preds.shape}, target {target.shape}, bias_preds {bias_preds.shape}"
            )
        if bias_preds.ndim == 2:
            p_label = bias_preds.double().softmax(dim=1).gather(1, target.long()[:, None]).squeeze(1)
            conflicting = 1.0 - p_label
            self.wrong_count += (bias_preds.argmax(dim=1) != target).double().sum()
        else:
            conflicting = (bias_preds != target).double()
            self.wrong_count += conflicting.sum()
        right = (preds == target).double()
        groups = torch.stack([1.0 - conflicting, conflicting])  # 2 × N
        self.weight += groups.sum(1)
        self.correct += (groups * right).sum(1)

    def compute_groups(self) -> dict[str, torch.Tensor]:
        """balanced (the score), aligned / conflicting weighted accuracies and their effective sizes."""
        nan = torch.tensor(math.nan, dtype=torch.float64, device=self.weight.device)
        acc = [self.correct[g] / self.weight[g] if self.weight[g] > 0 else nan for g in (0, 1)]
        present = [a for a, w in zip(acc, self.weight, strict=True) if w > 0]
        return {
            "balanced": torch.stack(present).mean() if present else nan,
            "aligned": acc[0],
            "conflicting": acc[1],
            "aligned_size": self.weight[0],
            "conflicting_size": self.weight[1],
            "wrong_count": self.wrong_count,
        }

    def compute(self) -> torch.Tensor:
        return self.compute_groups()["balanced"]


def pseudo_balanced_se(groups: dict[str, torch.Tensor]) -> float:
    """Binomial standard error of the pseudo-balanced score: ½·√(Σ_g a_g(1 − a_g)/n_g) over the two groups
    (a_g the weighted accuracy, n_g the effective size; a group with no weight contributes nothing)."""
    variance = 0.0
    for group in ("aligned", "conflicting"):
        acc, size = float(groups[group]), float(groups[f"{group}_size"])
        if size > 0 and not math.isnan(acc):
            variance += acc * (1.0 - acc) / size
    return 0.5 * math.sqrt(variance)


def keep_last_epoch(best_score: float, last_score: float, last_se: float, margin_se: float) -> bool:
    """Whether `best.ckpt` should be the last epoch although an earlier one scored `best_score`.

    Why: every epoch is scored on the same few pseudo-conflicting validation images, so the maximum over
    100 epochs is biased upwards by chance, and an early, still-biased epoch can win by a couple of lucky
    images (the background-colour tree picked epochs 0, 1 and 6 that way). The last epoch is the protocol's
    default (LfF keeps the final model); an earlier one replaces it only when it scores more than
    `margin_se` standard errors of the score above it — the one-standard-error rule of model selection.
    """
    return best_score - last_score <= margin_se * last_se


def selection_fallback(conflicting_size: float, min_group: float) -> bool:
    """Whether the pseudo-group rule is too noisy to select a checkpoint: fewer than `min_group` effective
    pseudo-conflicting validation images.

    Why a minimum: the groups are fixed for a run (one bias model, one validation split), so every epoch is
    scored on the same few "bias model wrong" images. With n of them, one image moves the score by 1/(2n) and
    the group's accuracy has a binomial standard error up to 0.5/√n; at 1 % conflicting (≈ 9 of 400 images on
    the embedded CMNIST) an early, biased epoch wins by chance, and a fully biased epoch can win outright
    when the group is mostly aligned images the bias model happens to miss. Below the minimum (default 16:
    standard error ≤ 12.5 points) the stage keeps the *last* epoch instead, LfF's own protocol (it saves the
    final model), recorded as the selection rule in metrics.json.
    """
    return conflicting_size < min_group
