"""Top-K selection: file content, ranks, per-class counts, precision; the writer inside a predict run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from diffinject.callbacks import TopKWriter
from diffinject.callbacks.topk import COLUMNS, conflict_stats, rank_scores, select_topk, topk_precision
from diffinject.stages import BiasClassifier
from test_classifiers import ARGS, TinyBiasedDataModule, tiny_trainer

SCORES = {
    "index": torch.tensor([0, 1, 2, 3, 4, 5, 6]),
    "label": torch.tensor([0, 0, 0, 1, 1, 1, 1]),
    "loss": torch.tensor([0.1, 2.0, 0.5, 3.0, 0.2, 3.0, 1.0]),
    "bias": torch.tensor([0, 1, 0, 0, 1, 1, -1]),
}


def test_select_topk_per_class_ranks_and_ties() -> None:
    rows = select_topk(SCORES, k=2, per_class=True)
    assert [(r["index"], r["label"], r["rank"]) for r in rows] == [(1, 0, 1), (2, 0, 2), (3, 1, 1), (5, 1, 2)]
    # equal losses (items 3 and 5) are ordered by dataset index
    assert rank_scores(SCORES["index"], SCORES["label"], SCORES["loss"]).tolist() == [3, 1, 2, 1, 4, 2, 3]


def test_select_topk_global_and_small_classes() -> None:
    rows = select_topk(SCORES, k=3, per_class=False)
    assert [(r["index"], r["rank"]) for r in rows] == [(3, 1), (5, 2), (1, 3)]
    everything = select_topk(SCORES, k=10, per_class=True)  # K larger than a class: all of it
    assert len(everything) == 7
    with pytest.raises(ValueError, match="k >= 1"):
        select_topk(SCORES, k=0)


def test_topk_precision_counts_only_known_bias() -> None:
    rows = select_topk(SCORES, k=2)  # (1: 0≠1 ✓), (2: 0=0), (3: 1≠0 ✓), (5: 1=1)
    assert topk_precision(rows) == pytest.approx(0.5)
    assert topk_precision([{"label": 1, "bias": -1}]) is None


def test_conflict_stats_recall_and_ceiling() -> None:
    # conflicting items: 1 (class 0), 3 (class 1); item 6 has unknown bias
    rows = select_topk(SCORES, k=2)  # selects 1, 2, 3, 5 → both conflicting items
    stats = conflict_stats(SCORES, rows, k=2)
    assert stats == {"num_conflicting_scored": 2, "recall": 1.0, "max_precision": 0.5}
    rows = select_topk(SCORES, k=1, per_class=False)  # item 3 only
    assert conflict_stats(SCORES, rows, k=1, per_class=False)["recall"] == 0.5
    unknown = {**SCORES, "bias": torch.full((7,), -1)}
    assert conflict_stats(unknown, rows, k=1)["recall"] is None


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def test_writer_in_a_predict_run(tmp_path: Path) -> None:
    data = TinyBiasedDataModule(n_train=60, ratio=0.1)
    tiny_trainer(tmp_path, max_epochs=4).fit(BiasClassifier(**ARGS, lr=1e-2), datamodule=data)
    output = tmp_path / "bias" / "topk.csv"
    writer = TopKWriter(output=str(output), k=4, per_class=True)
    scorer = BiasClassifier(**ARGS, weights=str(tmp_path / "checkpoints" / "best.ckpt"))
    trainer = tiny_trainer(tmp_path, callbacks=[writer])
    assert trainer.predict(scorer, datamodule=data, return_predictions=False) is None

    rows = read_csv(output)
    counts = {label: sum(r["label"] == label for r in rows) for label in ("0", "1", "2")}
    assert counts == {"0": 4, "1": 4, "2": 4}
    for label in ("0", "1", "2"):
        ranked = [r for r in rows if r["label"] == label]
        assert [int(r["rank"]) for r in ranked] == [1, 2, 3, 4]
        losses = [float(r["loss"]) for r in ranked]
        assert losses == sorted(losses, reverse=True)
    # the file agrees with the truth of the training set (bias column = evaluation only)
    train = data.train_eval_dataset
    for r in rows:
        i = int(r["index"])
        assert int(r["label"]) == int(train.labels[i]) and int(r["bias"]) == int(train.biases[i])

    scores = read_csv(tmp_path / "bias" / "topk_scores.csv")
    assert sorted(int(r["index"]) for r in scores) == list(range(60))
    # the highest-loss items of each class are the ones in topk.csv
    for label in ("0", "1", "2"):
        top = sorted((r for r in scores if r["label"] == label), key=lambda r: -float(r["loss"]))[:4]
        assert {r["index"] for r in top} == {r["index"] for r in rows if r["label"] == label}

    summary = json.loads((tmp_path / "bias" / "topk_summary.json").read_text())
    conflicting = sum(r["label"] != r["bias"] for r in rows)
    assert summary["precision"] == pytest.approx(conflicting / 12)
    assert summary["num_selected"] == 12 and summary["num_scored"] == 60
    assert summary["per_class_counts"] == {"0": 4, "1": 4, "2": 4}
    n_conflicting = int((train.labels != train.biases).sum())
    assert summary["conflicting_rate_in_scored"] == pytest.approx(n_conflicting / 60)
    assert summary["recall"] == pytest.approx(conflicting / n_conflicting)
    # the colour-biased f_B ranks the conflicting items on top: every one of them lands in the top-4
    assert conflicting == min(n_conflicting, 12)
    assert not list(output.parent.glob(".*shard*"))  # shards cleaned up
