"""Pair building for the injection stage: pools, per-sample seeding, top-K file handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffinject.data.base import BiasedDataModule
from diffinject.data.datasets import TensorImageDataset
from diffinject.data.pairs import (
    ALIGNED_GUESS_MAX_LOSS,
    InjectionPairsDataModule,
    Scores,
    plan_pairs,
    read_scores,
    select_content_pool,
    select_style_pool,
)


def _scores(losses: list[float], labels: list[int]) -> Scores:
    n = len(losses)
    return Scores(np.arange(n), np.array(labels), np.array(losses, dtype=float), Path("topk.csv"))


def test_content_pool_per_class_and_global() -> None:
    scores = _scores([0.1, 5.0, 3.0, 0.2, 4.0, 4.0], [0, 0, 0, 1, 1, 1])
    assert select_content_pool(scores, 2, "per_class").tolist() == [1, 2, 4, 5]
    assert select_content_pool(scores, 1, "per_class").tolist() == [1, 4]  # tie 4.0/4.0 → lower index
    assert select_content_pool(scores, 3, "global").tolist() == [1, 4, 5]
    with pytest.raises(ValueError, match="fewer than K=4"):
        select_content_pool(scores, 4, "per_class")
    with pytest.raises(ValueError, match="K must be >= 1"):
        select_content_pool(scores, 0, "per_class")


def test_style_pools() -> None:
    scores = _scores([0.1, 5.0, 0.5, 0.9, 0.01], [0, 0, 1, 1, 1])
    pool = np.array([1])
    assert select_style_pool(5, pool, "all", None).tolist() == [0, 1, 2, 3, 4]
    assert select_style_pool(5, pool, "rest", None).tolist() == [0, 2, 3, 4]
    # aligned guess: outside the pool and CE < ln 2 (p_y > 1/2)
    assert 0.5 < ALIGNED_GUESS_MAX_LOSS < 0.9
    assert select_style_pool(5, pool, "aligned_guess", scores).tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="topk_scores.csv"):
        select_style_pool(5, pool, "aligned_guess", None)


def test_plan_is_per_sample_deterministic() -> None:
    content, style = np.arange(10, 20), np.arange(100, 200)
    short = plan_pairs(5, content, style, seed=3)
    long = plan_pairs(50, content, style, seed=3)
    # sample i does not depend on how many samples there are (nor on batches or devices)
    assert np.array_equal(short.content, long.content[:5]) and np.array_equal(short.style, long.style[:5])
    assert np.array_equal(short.noise_seed, long.noise_seed[:5])
    other = plan_pairs(50, content, style, seed=4)
    assert not np.array_equal(long.style, other.style)
    assert set(long.content) <= set(content) and set(long.style) <= set(style)
    assert len(set(long.content.tolist())) > 5  # drawn with replacement over the whole pool
    with pytest.raises(ValueError, match="cannot pair"):
        plan_pairs(3, np.array([], dtype=int), style, seed=0)


def test_read_scores_errors(tmp_path: Path) -> None:
    bad = tmp_path / "topk.csv"
    bad.write_text("index,label\n1,2\n")
    with pytest.raises(ValueError, match="lacks column"):
        read_scores(bad)
    bad.write_text("index,label,loss\n1,2,x\n")
    with pytest.raises(ValueError, match="line 2"):
        read_scores(bad)
    bad.write_text("index,label,loss\n1,2,0.5\n1,2,0.7\n")
    with pytest.raises(ValueError, match="twice"):
        read_scores(bad)
    with pytest.raises(FileNotFoundError, match=r"configs/cmnist/topk\.yaml"):
        read_scores(tmp_path / "runs/cmnist/1pct/bias/topk.csv")


def test_read_scores_refuses_negative_indices_and_non_finite_losses(tmp_path: Path) -> None:
    bad = tmp_path / "topk.csv"
    bad.write_text("index,label,loss\n0,1,0.5\n-3,1,0.7\n")
    with pytest.raises(ValueError, match=r"topk\.csv, line 3: index -3 is negative"):
        read_scores(bad)
    for loss in ("nan", "inf", "-inf"):
        bad.write_text(f"index,label,loss\n0,1,0.5\n1,1,{loss}\n")
        with pytest.raises(ValueError, match=rf"topk\.csv, line 3: loss {loss} is not a finite number"):
            read_scores(bad)


class _TinyData(BiasedDataModule):
    """Six training images, labels 0 0 0 1 1 1 (nothing decoded from disk)."""

    name, pct, num_classes, image_size, channels = "tiny", "1pct", 2, 4, 3

    def _build_train(self) -> tuple[TensorImageDataset, TensorImageDataset]:
        labels = np.array([0, 0, 0, 1, 1, 1])
        dataset = TensorImageDataset(torch.zeros(6, 3, 4, 4, dtype=torch.uint8), labels, labels)
        return dataset, dataset

    def _build_val(self) -> TensorImageDataset:
        return self._build_train()[0]


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ("0,0,1.0\n4,1,2.0\n9,1,3.0\n", r"names index 9 but the training split has 6 images"),
        (
            "0,0,1.0\n3,0,2.0\n4,1,3.0\n",
            r"topk\.csv: 1 row\(s\) disagree with the training split's labels, e.g. index 3: label 0 in the "
            r"file, 1 in the data",
        ),
    ],
)
def test_topk_rows_are_checked_against_the_dataset(tmp_path: Path, rows: str, pattern: str) -> None:
    topk = tmp_path / "topk.csv"
    topk.write_text("index,label,loss\n" + rows)
    pairs = InjectionPairsDataModule(_TinyData(), str(topk), ratio=1.0, k=1)
    with pytest.raises(ValueError, match=pattern):
        pairs.setup("predict")
