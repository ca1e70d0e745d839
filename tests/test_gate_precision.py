"""`benchmarks/gate_precision.py` arithmetic: precision/recall/base rate of the gate, empty cases None."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gate_precision", REPO / "benchmarks" / "gate_precision.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rates():
    return load_benchmark().selection_rates


def test_hand_computed_precision_recall_base_rate(rates) -> None:
    # 8 images: accepted 0,1,2,3,4; good 0,1,5 → both 0,1
    accepted = np.array([1, 1, 1, 1, 1, 0, 0, 0], dtype=bool)
    good = np.array([1, 1, 0, 0, 0, 1, 0, 0], dtype=bool)
    out = rates(accepted, good)
    assert out["precision"] == pytest.approx(2 / 5)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["base_rate"] == pytest.approx(3 / 8)
    assert out["lift"] == pytest.approx((2 / 5) / (3 / 8))
    assert (out["num_images"], out["num_selected"], out["num_target"], out["num_both"]) == (8, 5, 3, 2)


def test_perfect_and_useless_gates(rates) -> None:
    good = np.array([True, False, True, False])
    assert rates(good, good)["precision"] == 1.0 and rates(good, good)["recall"] == 1.0
    everything = rates(np.ones(4, dtype=bool), good)
    assert everything["precision"] == everything["base_rate"] == 0.5
    assert everything["recall"] == 1.0 and everything["lift"] == 1.0


def test_empty_cases_are_none(rates) -> None:
    none_accepted = rates(np.zeros(3, dtype=bool), np.array([True, False, False]))
    assert none_accepted["precision"] is None and none_accepted["lift"] is None
    assert none_accepted["recall"] == 0.0 and none_accepted["base_rate"] == pytest.approx(1 / 3)

    none_good = rates(np.array([True, False, True]), np.zeros(3, dtype=bool))
    assert none_good["recall"] is None
    assert none_good["precision"] == 0.0 and none_good["base_rate"] == 0.0
    assert none_good["lift"] is None  # base rate 0: no ratio

    empty = rates(np.zeros(0, dtype=bool), np.zeros(0, dtype=bool))
    assert all(empty[k] is None for k in ("precision", "recall", "base_rate", "lift"))
    assert empty["num_images"] == 0


def test_arrays_must_match(rates) -> None:
    with pytest.raises(ValueError, match="equal-length"):
        rates(np.zeros(3, dtype=bool), np.zeros(4, dtype=bool))
