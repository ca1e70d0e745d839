"""benchmarks/premise_signals.py: the figures from two models' softmax outputs, on hand-made tensors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from premise_signals import signals  # noqa: E402


def _onehot(classes: list[int], confidence: float = 0.9, num_classes: int = 3) -> torch.Tensor:
    probs = torch.full((len(classes), num_classes), (1 - confidence) / (num_classes - 1))
    probs[torch.arange(len(classes)), torch.tensor(classes)] = confidence
    return probs


def test_signals_on_a_hand_made_split() -> None:
    train_labels = torch.tensor([0, 1, 2, 0])
    train_biases = torch.tensor([0, 2, 2, -1])  # image 1 is conflicting, image 3 unknown
    val_labels = torch.tensor([0, 1, 2, 2])
    data = {
        "train": (None, train_labels, train_biases),
        "val": (None, val_labels, torch.full((4,), -1)),
    }
    bias = {"train": _onehot([0, 2, 2, 1], 0.8), "val": _onehot([0, 1, 1, 0])}  # wrong on train 1, 3
    vanilla_val = _onehot([0, 2, 2, 0])
    out = signals(bias, vanilla_val, data)
    assert out["bias_train_wrong"] == 0.5 and out["bias_train_wrong_n"] == 2
    assert out["bias_wrong_conf"] == pytest.approx(0.8)
    assert out["bias_wrong_p_label"] == pytest.approx(0.1)
    assert out["bias_wrong_conflicting"] == 1.0  # of the wrong ones with a known bias, all conflicting
    assert out["val_acc_bias"] == 0.5 and out["val_acc_vanilla"] == 0.5
    assert out["val_wrong_n"] == 2 and out["vanilla_right_on_bias_wrong"] == 0.5
    assert out["vanilla_same_wrong_class"] == 0.5  # val image 3: both say 0
    assert out["val_bias_only"] == 1 and out["val_view_only"] == 1 and out["val_z"] == 0.0
