"""Grouped accuracy (overall / aligned / conflicting / worst-group) against hand counts."""

from __future__ import annotations

import math

import pytest
import torch

from diffinject.measures.metrics import GroupedAccuracy, PseudoGroupAccuracy, to_floats


def test_grouped_accuracy_matches_a_hand_count() -> None:
    # groups (label, bias): (0,0) 3 items 2 right; (1,1) 2 items 2 right; (0,1) 2 items 0 right;
    # (1,0) 1 item 1 right; unknown bias: 2 items 1 right.
    target = torch.tensor([0, 0, 0, 1, 1, 0, 0, 1, 1, 0])
    bias = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, -1, -1])
    preds = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    metric = GroupedAccuracy(num_classes=2)
    metric.update(preds[:4], target[:4], bias[:4])  # accumulates over batches
    metric.update(preds[4:], target[4:], bias[4:])
    out = metric.compute()
    assert float(out["acc"]) == pytest.approx(6 / 10)
    assert float(out["acc_aligned"]) == pytest.approx(4 / 5)
    assert float(out["acc_conflicting"]) == pytest.approx(1 / 3)
    assert float(out["acc_worst_group"]) == pytest.approx(0.0)
    assert float(out["acc_group_mean"]) == pytest.approx((2 / 3 + 1 + 0 + 1) / 4)


def test_logits_are_argmaxed_and_empty_groups_are_nan() -> None:
    metric = GroupedAccuracy(num_classes=3)
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    metric.update(logits, torch.tensor([0, 2]), torch.tensor([0, 2]))  # only aligned items
    out = metric.compute()
    assert float(out["acc"]) == pytest.approx(0.5)
    assert float(out["acc_aligned"]) == pytest.approx(0.5)
    assert math.isnan(float(out["acc_conflicting"]))
    assert float(out["acc_worst_group"]) == 0.0  # only the two non-empty groups count
    assert to_floats(out, "val/")["val/acc_conflicting"] is None


def test_rectangular_bias_space_and_reset() -> None:
    metric = GroupedAccuracy(num_classes=2, num_bias_classes=3)
    metric.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), torch.tensor([2, 1, 0]))
    out = metric.compute()
    assert float(out["acc_aligned"]) == 1.0 and float(out["acc_conflicting"]) == 1.0
    metric.reset()
    assert int(metric.total.sum()) == 0


def test_bad_inputs_name_the_values() -> None:
    metric = GroupedAccuracy(num_classes=2)
    with pytest.raises(ValueError, match=r"bias must lie in \[-1, 2\)"):
        metric.update(torch.tensor([0]), torch.tensor([0]), torch.tensor([5]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        metric.update(torch.tensor([0]), torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape mismatch"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([0]))


def test_pseudo_group_accuracy_balances_bias_model_right_and_wrong() -> None:
    metric = PseudoGroupAccuracy()
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    bias_preds = torch.tensor([0, 1, 2, 0, 2, 0])  # right on the first four, wrong on the last two
    preds = torch.tensor([0, 1, 2, 1, 1, 0])  # 3/4 where the bias model is right, 1/2 where it is wrong
    metric.update(preds, target, bias_preds)
    assert float(metric.compute()) == pytest.approx((0.75 + 0.5) / 2)
    metric.reset()
    metric.update(torch.eye(3)[[0, 1]], torch.tensor([0, 2]), torch.tensor([0, 2]))  # logits; one group only
    assert float(metric.compute()) == pytest.approx(0.5)
    metric.reset()
    assert math.isnan(float(metric.compute()))
    with pytest.raises(ValueError, match="bias_preds"):
        metric.update(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0]))
